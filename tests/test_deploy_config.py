"""The deployment files, checked without Docker: linters, validators, and cross-references between the files.

Docker Compose's own `config` validates the compose files (no engine needed), hadolint lints the Dockerfile, nginx
and promtool check their configurations; the rest checks that every file names only services, ports, volumes and
paths that exist. Live behaviour (gateway, scraping, dashboard metrics) is in test_deploy_live.py.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from .deploy_support import (
    COMPOSE,
    COMPOSE_CPU,
    DASHBOARD,
    DEPLOY,
    K8S,
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
    upstream_host, upstream_port = re.search(r"server (\w+):(\d+);", nginx).groups()
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

def test_kubernetes_manifest_is_consistent():
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(K8S.read_text())}
    assert set(documents) == {"Deployment", "Service", "PersistentVolumeClaim"}
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


def test_probe_script_is_executable():
    assert PROBE.stat().st_mode & 0o111
    compile(PROBE.read_text(), str(PROBE), "exec")


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU, K8S, PROMETHEUS_CONF])
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
