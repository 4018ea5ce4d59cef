"""The deployment files, checked without Docker: linters, validators, and cross-references between the files.

Docker Compose's own `config` validates the compose files (no engine needed), hadolint lints the Dockerfile, nginx
and promtool check their configurations; the rest checks that every file names only services, ports, volumes and
paths that exist. Live behaviour (gateway, scraping, dashboard metrics) is in test_deploy_live.py.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess

import pytest
import yaml

from server.metrics import Metrics

from .deploy_support import (
    COMPOSE,
    COMPOSE_CPU,
    DASHBOARD,
    DEPLOY,
    K8S,
    K8S_AUTOSCALING,
    NGINX_CONF,
    PROBE,
    PROMETHEUS_CONF,
    RELAT_ENV,
    ROOT,
    compose_yaml,
    dockerfile_instructions,
    gateway_config,
    nginx_command,
    tool,
)
from .server_support import free_port


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


# --- Dockerfile ----------------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    result = run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_only_files_that_exist_and_are_in_the_build_context():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore is a whitelist"
    allowed = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    sources = [source for instruction, args in dockerfile_instructions()
               if instruction == "COPY" and "--from=" not in args for source in args.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == entry or source.startswith(entry + "/") for entry in allowed), \
            f"{source} is not in the build context (.dockerignore)"


def test_dockerfile_runs_relat_serve_as_non_root_with_a_model_cache_volume_and_a_health_check():
    instructions = dockerfile_instructions()
    last = {name: args for name, args in instructions}  # the runtime stage's, which come last
    assert json.loads(last["ENTRYPOINT"]) == ["relat", "serve"]
    user = last["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert json.loads(last["VOLUME"]) == [dockerfile_env()["HF_HOME"]]
    assert "relat-probe /health" in last["HEALTHCHECK"].replace('", "', " ")
    assert re.search(r"--start-period=\d+m", last["HEALTHCHECK"]), "a model may take minutes to load"
    assert ("RUN", "relat prepare") in instructions, "the embedded model is converted at build time"
    assert dockerfile_env()["RELAT_HOST"] == "0.0.0.0"
    assert set(re.findall(r"RELAT_\w+", (ROOT / "Dockerfile").read_text())) <= RELAT_ENV


# --- Compose -------------------------------------------------------------------------------------------------------

def compose_config(*files) -> dict:
    """The project as Docker Compose itself resolves it (merging overrides, validating against its schema)."""
    command = [tool("docker-compose")] + [arg for f in files for arg in ("-f", str(f))] + ["config", "--format", "json"]
    result = run(command, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_files_are_valid_for_docker_compose():
    gpu = compose_config(COMPOSE)
    devices = gpu["services"]["relat"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cpu = compose_config(COMPOSE, COMPOSE_CPU)
    relat = cpu["services"]["relat"]
    assert "deploy" not in relat, "the CPU override must drop the GPU reservation"
    assert relat["build"]["args"]["VARIANT"] == "cpu"
    assert relat["image"] != gpu["services"]["relat"]["image"], "CPU and GPU images need different tags"
    assert set(cpu["services"]) == set(gpu["services"])


def test_compose_references_only_what_exists():
    compose = compose_yaml(COMPOSE)
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    relat = services["relat"]
    assert (ROOT / relat["build"]["context"] / "Dockerfile").is_file()
    assert set(relat["environment"]) <= RELAT_ENV
    mounts = {}
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for spec in service.get("volumes", []):
            source, target = spec.split(":")[:2]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} mounts undeclared volume {source}"
            mounts[(name, target)] = source
    # The model cache volume is where the image keeps its models.
    assert mounts[("relat", dockerfile_env()["HF_HOME"])] == "models"
    # The gateway's configuration is mounted where nginx reads it; its upstream and listen port are these services'.
    assert mounts[("gateway", "/etc/nginx/nginx.conf")] == "./deploy/nginx/nginx.conf"
    nginx = NGINX_CONF.read_text()
    upstream_host, upstream_port = re.search(r"server (\w+):(\d+)[ ;]", nginx).groups()
    assert upstream_host in services and upstream_port in relat["expose"]
    listen = re.search(r"listen (\d+);", nginx).group(1)
    assert any(port.endswith(f":{listen}") for port in services["gateway"]["ports"])
    # Prometheus reads its configuration from the mounted file and scrapes relat on its exposed port.
    assert mounts[("prometheus", "/etc/prometheus/prometheus.yml")] == "./deploy/prometheus/prometheus.yml"
    targets = [t for job in yaml.safe_load(PROMETHEUS_CONF.read_text())["scrape_configs"]
               for config in job["static_configs"] for t in config["targets"]]
    for target in targets:
        host, port = target.split(":")
        assert host in services and port in services[host].get("expose", []) + ["9090"]
    # Grafana: provisioning where Grafana looks, dashboards where the provider points, data source is the service.
    grafana = {target: source for (name, target), source in mounts.items() if name == "grafana"}
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/relat.yml").read_text())["providers"][0]
    assert grafana[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert re.fullmatch(r"http://prometheus:9090", url) and any(
        p.endswith(":9090") for p in services["prometheus"]["ports"])
    # relat is stopped only after its drain timeout has passed.
    drain = int(re.fullmatch(r"\$\{RELAT_DRAIN_TIMEOUT:-(\d+)\}", relat["environment"]["RELAT_DRAIN_TIMEOUT"]).group(1))
    assert int(relat["stop_grace_period"].rstrip("s")) > drain


def test_cpu_override_touches_only_the_relat_service():
    override = compose_yaml(COMPOSE_CPU)
    assert set(override["services"]) == {"relat"}
    assert override["services"]["relat"]["deploy"][0] == "!reset"
    assert set(override["services"]["relat"]["environment"]) <= RELAT_ENV


# --- Gateway, Prometheus, Grafana ----------------------------------------------------------------------------------

def test_gateway_configuration_passes_nginx_t(tmp_path):
    conf = tmp_path / "nginx.conf"
    conf.write_text(gateway_config(free_port(), free_port(), tmp_path))
    result = run(nginx_command(conf, tmp_path, "-t"))
    assert result.returncode == 0, result.stderr


def test_gateway_limits_each_key_and_each_address_on_the_api_with_429():
    nginx = NGINX_CONF.read_text()
    zones = dict(re.findall(r"^\s*limit_req_zone (\S+) zone=(\w+):\d+m rate=\d+r/s;", nginx, re.M))
    zones = {zone: key for key, zone in zones.items()}
    assert zones == {"relat_per_key": "$http_authorization", "relat_per_client": "$binary_remote_addr"}
    assert re.search(r"^\s*limit_req_status 429;", nginx, re.M)
    api = re.search(r"location /v1/ \{(.*?)\}", nginx, re.S).group(1)
    limited = dict(re.findall(r"limit_req zone=(\w+) burst=(\d+) nodelay;", api))
    assert set(limited) == set(zones), "every API request meets both limits"
    # An address may carry several keys: its limit is the looser one.
    rates = {zone: int(rate) for zone, rate in re.findall(r"zone=(\w+):\d+m rate=(\d+)r/s;", nginx)}
    assert rates["relat_per_client"] >= rates["relat_per_key"]
    assert int(limited["relat_per_client"]) >= int(limited["relat_per_key"])
    # Probes stay unlimited (location /), and the key never reaches the access log.
    assert "limit_req" not in re.search(r"location / \{(.*?)\}", nginx, re.S).group(1)
    log_format = re.search(r"log_format relat (.*?);", nginx, re.S).group(1)
    assert "authorization" not in log_format.lower()


def test_prometheus_configuration_passes_promtool():
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS_CONF)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_provisioned_and_covers_the_loop():
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {source["uid"] for source in datasource["datasources"]}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids
            exprs.append(target["expr"])
    text = "\n".join(exprs)
    for metric in ("relat_time_to_first_token_seconds", "relat_ttt_time_seconds", "relat_ttt_steps",
                   "relat_recon_loss_before", "relat_recon_loss_after", "relat_requests_waiting",
                   "relat_errors_total"):
        assert metric in text, f"the dashboard shows no {metric}"
    assert "by (code)" in text


# --- Kubernetes ----------------------------------------------------------------------------------------------------

def k8s_documents(path=K8S) -> dict[str, dict]:
    documents = list(yaml.safe_load_all(path.read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    assert len(kinds) == len(documents), f"{path.name}: one object of each kind"
    return kinds


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects pods with these labels."""
    ok = selector.get("matchLabels", {}).items() <= labels.items()
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        ok &= {"In": value in expression.get("values", []), "NotIn": value not in expression.get("values", []),
               "Exists": value is not None, "DoesNotExist": value is None}[operator]
    return bool(ok) and bool(selector)


def container_env(deployment: dict) -> dict[str, str | None]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item.get("value") for item in container["env"]}


def test_kubernetes_manifest_is_consistent():
    documents = k8s_documents()
    assert set(documents) == {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"}
    deployment, service, claim = documents["Deployment"], documents["Service"], documents["PersistentVolumeClaim"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": int(dockerfile_env()["RELAT_PORT"])}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes
    assert {m["mountPath"] for m in container["volumeMounts"]} == {dockerfile_env()["HF_HOME"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert set(env) <= RELAT_ENV
    # Grace period: the preStop pause, then relat's drain, must both fit before SIGKILL.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + int(env["RELAT_DRAIN_TIMEOUT"])
    # Same non-root user as the image.
    user = next(args for name, args in reversed(dockerfile_instructions()) if name == "USER")
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user.split(":")[0])


def test_kubernetes_replicas_can_run_side_by_side_on_different_nodes():
    documents = k8s_documents()
    deployment, claim = documents["Deployment"], documents["PersistentVolumeClaim"]
    # The model cache is mounted by every replica, wherever it runs.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # The autoscaler owns the count: re-applying the manifest must not reset it.
    assert "replicas" not in deployment["spec"]
    # A rollout replaces one pod at a time and never asks for a GPU more than the replicas hold.
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_kubernetes_pod_disruption_budget_covers_the_deployments_pods():
    documents = k8s_documents()
    budget, deployment = documents["PodDisruptionBudget"], documents["Deployment"]
    assert budget["apiVersion"] == "policy/v1"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(budget["spec"]["selector"], labels)
    # One pod at a time, and a single replica does not block node drains (minAvailable: 1 would).
    assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]


def test_kubernetes_replicas_spread_over_zones_and_nodes():
    pod = k8s_documents()["Deployment"]["spec"]["template"]
    constraints = pod["spec"]["topologySpreadConstraints"]
    keys = [constraint["topologyKey"] for constraint in constraints]
    assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for constraint in constraints:
        assert selects(constraint["labelSelector"], pod["metadata"]["labels"])
        assert constraint["maxSkew"] == 1
        # Non-GPU nodes count as domains too: a hard rule would leave replicas Pending.
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]


def test_kubernetes_readiness_gates_traffic_until_the_model_is_loaded():
    (container,) = k8s_documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    # /ready is 503 while loading and draining; /health is 200 from the moment relat listens. Both need no key.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # The app's set of keyless paths, read from its source (importing server.app would import torch).
    open_paths = re.search(r"^OPEN_PATHS = frozenset\((\{.*?\})\)", (ROOT / "server/app.py").read_text(), re.M)
    assert {"/ready", "/health"} <= ast.literal_eval(open_paths.group(1))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "httpHeaders" not in container[probe]["httpGet"]
    # The startup probe gives the model minutes to load before liveness may restart the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_kubernetes_autoscaler_scales_the_deployment_on_relats_queue_depth():
    scaled = k8s_documents(K8S_AUTOSCALING)["ScaledObject"]
    deployment = k8s_documents()["Deployment"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == \
        (deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"])
    spec = scaled["spec"]
    assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"], "never to zero: a cold replica loads for minutes"
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    # The metric names are the ones relat exports, read from server/metrics.py's gauges.
    metrics = Metrics()
    waiting, running = (gauge.describe()[0].name for gauge in (metrics.waiting, metrics.running))
    triggers = {trigger["name"]: trigger for trigger in spec["triggers"]}
    assert set(triggers) == {"queue-depth", "in-flight"}
    env = container_env(deployment)
    service = k8s_documents()["Service"]["metadata"]["name"]
    for name, metric in (("queue-depth", waiting), ("in-flight", running)):
        trigger = triggers[name]
        assert trigger["type"] == "prometheus"
        assert trigger.get("metricType", "AverageValue") == "AverageValue", "replicas = ceil(sum / threshold)"
        query = trigger["metadata"]["query"]
        assert re.fullmatch(rf'sum\({metric}\{{namespace="\w+", service="{service}"\}}\)', query), query
        assert re.fullmatch(r"https?://\S+", trigger["metadata"]["serverAddress"])
    # Scale out well before the queue is full (429), and hold replicas while their engine slots are busy.
    queue = float(triggers["queue-depth"]["metadata"]["threshold"])
    assert 0 < queue <= int(env["RELAT_MAX_QUEUE"]) / 2
    assert float(triggers["in-flight"]["metadata"]["threshold"]) == int(env["RELAT_MAX_CONCURRENCY"])


def test_probe_script_is_executable():
    assert PROBE.stat().st_mode & 0o111
    compile(PROBE.read_text(), str(PROBE), "exec")


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU, K8S, K8S_AUTOSCALING, PROMETHEUS_CONF])
def test_yaml_files_have_no_tabs_or_duplicate_keys(path):
    class Strict(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            duplicates = {k for k in keys if keys.count(k) > 1}
            assert not duplicates, f"{path.name}: duplicate keys {duplicates}"
            return super().construct_mapping(node, deep)

    Strict.add_constructor("!reset", lambda loader, node: None)
    assert "\t" not in path.read_text()
    list(yaml.load_all(path.read_text(), Loader=Strict))
