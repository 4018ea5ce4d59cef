"""The deployment for real: `relat serve` on loopback with a tiny model, behind nginx running the project's gateway
configuration, scraped by Prometheus running the project's scrape configuration.

Only addresses and temporary paths are adapted (deploy_support.gateway_config, prometheus_config). Timing checks are
relative: a stream must spread over the generation instead of arriving at its end, never "within N seconds".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import build_tiny
from .deploy_support import DASHBOARD, PROBE, Service, gateway_service, prometheus_config, tool
from .server_support import free_port

KEY = "sk-deploy-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_PROMPT_TOKENS = 64
LONG = 200  # answer tokens: long enough for a stream to be seen spreading over time


# --- the three processes, once per module ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen3"
    loaded = build_tiny("qwen3", tokenizer)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def relat(model_dir, tmp_path_factory):
    """relat serve with one slot and a queue of one, so that a third concurrent request is refused."""
    port = free_port()
    command = [tool("relat"), "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--api-key", KEY, "--max-concurrency", "1", "--max-queue", "1",
               "--max-prompt-tokens", str(MAX_PROMPT_TOKENS)]
    service = Service("relat", command, tmp_path_factory.mktemp("relat") / "relat.log",
                      env={**os.environ, "RELAT_DEVICE": "cpu"})
    service.port = port
    with service.serving(f"http://127.0.0.1:{port}", "/ready", 180, "readiness"):
        service.model = httpx.get(f"{service.url}/v1/models", headers=AUTH, timeout=5).json()["data"][0]["id"]
        yield service


@pytest.fixture(scope="module")
def gateway(relat, tmp_path_factory):
    with gateway_service(relat.port, free_port(), tmp_path_factory.mktemp("nginx")) as service:
        yield service


@pytest.fixture(scope="module")
def prometheus(relat, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    conf = scratch / "prometheus.yml"
    conf.write_text(prometheus_config(relat.port))
    command = [tool("prometheus"), f"--config.file={conf}", f"--storage.tsdb.path={scratch / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}"]
    service = Service("prometheus", command, scratch / "prometheus.log")
    with service.serving(f"http://127.0.0.1:{port}", "/-/ready", 60, "readiness"):
        yield service


# --- helpers -------------------------------------------------------------------------------------------------------

def chat(model: str, text: str = "Count from one to ten.", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def stream_events(client: httpx.Client, url: str, body: dict, headers: dict | None = None):
    """(status, headers, [(arrival time, parsed data or '[DONE]')], error body) of one streamed request."""
    events = []
    with client.stream("POST", url, json=body, headers={**AUTH, **(headers or {})}) as response:
        if response.status_code != 200:
            return response.status_code, response.headers, events, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append((time.monotonic(), data if data == "[DONE]" else json.loads(data)))
    return response.status_code, response.headers, events, b""


def content_times(events) -> list[float]:
    return [t for t, data in events
            if isinstance(data, dict) and data.get("choices") and data["choices"][0]["delta"].get("content")]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and "type" in error
    assert response.headers.get("x-request-id"), "every response carries X-Request-Id"
    return error


def poll(check, timeout: float, interval: float = 0.5):
    """check()'s first truthy result, trying every `interval` seconds for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


# --- the gateway ---------------------------------------------------------------------------------------------------

def test_stream_arrives_through_the_gateway_chunk_by_chunk(relat, gateway):
    with httpx.Client(timeout=120) as client:
        # relat asks any proxy not to buffer its streams; nginx acts on the header and hides it from the client.
        status, headers, _, _ = stream_events(client, f"{relat.url}/v1/chat/completions",
                                              chat(relat.model, stream=True, max_completion_tokens=2))
        assert status == 200 and headers.get("x-accel-buffering") == "no"
        start = time.monotonic()
        status, headers, events, _ = stream_events(
            client, f"{gateway.url}/v1/chat/completions",
            # direct: no training before the first token, so that the timing says how the answer was delivered,
            # not how long the adapter took to train on a loaded machine.
            chat(relat.model, stream=True, max_completion_tokens=LONG, temperature=0, relat={"method": "direct"}))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert "x-accel-buffering" not in headers
    assert events[-1][1] == "[DONE]"
    times = content_times(events)
    assert len(times) >= LONG // 4, f"only {len(times)} content chunks"
    first, last = times[0], times[-1]
    # Buffered, every chunk would arrive together at the end (last - first close to 0). Streamed, the first token
    # arrives while most of the answer is still to be generated.
    assert last - first > 0.5 * (last - start), (first - start, last - start)


def test_request_id_survives_the_gateway(relat, gateway):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", headers={**AUTH, "X-Request-Id": "deploy-test-42"},
                          json=chat(relat.model, max_completion_tokens=4), timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "deploy-test-42"
    # Without one, the gateway makes one up, passes it to relat (which echoes it) and logs it.
    response = httpx.get(f"{gateway.url}/v1/models", headers=AUTH, timeout=10)
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated), generated
    assert poll(lambda: f"id={generated}" in gateway.output() and "id=deploy-test-42" in gateway.output(), 5)


def test_401_passes_through_with_its_body(relat, gateway):
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(relat.model),
                          headers={"Authorization": "Bearer wrong", "X-Request-Id": "deploy-test-401"}, timeout=30)
    assert_openai_error(response, 401)
    assert response.headers["x-request-id"] == "deploy-test-401"


def test_metrics_and_admin_routes_stay_inside(relat, gateway):
    for path in ("/metrics", "/admin/status"):
        assert httpx.get(f"{gateway.url}{path}", headers=AUTH, timeout=10).status_code == 404, path
        assert httpx.get(f"{relat.url}{path}", headers=AUTH, timeout=120).status_code == 200, path


def test_413_from_relat_passes_through_and_the_gateway_answers_its_own_in_the_same_shape(relat, gateway):
    too_long = " ".join(["word"] * (MAX_PROMPT_TOKENS * 4))
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(relat.model, too_long), headers=AUTH,
                          timeout=30)
    assert "gateway" not in assert_openai_error(response, 413)["message"], "this one is relat's, about the prompt"
    huge = chat(relat.model, "x" * (3 << 20))  # over the gateway's client_max_body_size
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=huge, headers=AUTH, timeout=30)
    error = assert_openai_error(response, 413)
    assert "gateway" in error["message"] and error["code"] == "payload_too_large"  # relat's code for the same


def test_429_from_a_full_queue_passes_through_with_retry_after(relat, gateway):
    """One slot and a queue of one: of four simultaneous long requests, at least one is refused."""
    results = []

    def one():
        with httpx.Client(timeout=120) as client:
            results.append(stream_events(client, f"{gateway.url}/v1/chat/completions",
                                         chat(relat.model, stream=True, max_completion_tokens=LONG)))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads)
    statuses = sorted(status for status, *_ in results)
    assert 200 in statuses and 429 in statuses, statuses
    for status, headers, _, body in results:
        if status == 429:
            assert headers.get("retry-after"), "429 without Retry-After"
            assert json.loads(body)["error"]["message"]
            assert headers.get("x-request-id")


# --- the image's probe script --------------------------------------------------------------------------------------

def test_probe_script_checks_health_and_readiness(relat):
    def probe(path: str, port: int) -> int:
        env = {**os.environ, "RELAT_PORT": str(port)}
        return subprocess.run([str(PROBE), path], env=env, capture_output=True, timeout=30).returncode

    assert probe("/health", relat.port) == 0
    assert probe("/ready", relat.port) == 0
    assert probe("/no-such-path", relat.port) == 1
    assert probe("/health", free_port()) == 1  # nothing listening


# --- Prometheus and the dashboard ----------------------------------------------------------------------------------

def prometheus_query(prometheus, expr: str) -> dict:
    response = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]


def live_sample_names(relat) -> set[str]:
    text = httpx.get(f"{relat.url}/metrics", timeout=10).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_prometheus_scrapes_relat_with_the_project_configuration(relat, gateway, prometheus):
    def target_up():
        result = prometheus_query(prometheus, 'up{job="relat"}')["result"]
        return result and result[0]["value"][1] == "1"

    assert poll(target_up, 30), httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).text
    response = httpx.post(f"{gateway.url}/v1/chat/completions", headers=AUTH,
                          json=chat(relat.model, max_completion_tokens=4), timeout=60)
    assert response.status_code == 200
    served = sum(sample.value for family in text_string_to_metric_families(httpx.get(f"{relat.url}/metrics").text)
                 for sample in family.samples if sample.name == "relat_requests_total")
    assert served >= 1

    def scraped():
        result = prometheus_query(prometheus, "sum(relat_requests_total)")["result"]
        return result and float(result[0]["value"][1]) >= served

    assert poll(scraped, 30), "Prometheus never saw the request"


def test_dashboard_queries_name_only_exported_metrics_and_evaluate(relat, gateway, prometheus):
    # An error and a success first, so that the labelled counters have samples.
    httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    httpx.post(f"{gateway.url}/v1/chat/completions", headers=AUTH, json=chat(relat.model, max_completion_tokens=4),
               timeout=60)
    exported = live_sample_names(relat)
    exprs = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]
    named = {name for expr in exprs for name in re.findall(r"\brelat_\w+", expr)}
    assert named and named <= exported, f"not exported by relat: {sorted(named - exported)}"
    for expr in exprs:  # valid PromQL for this Prometheus, with Grafana's interval variable filled in
        prometheus_query(prometheus, expr.replace("$__rate_interval", "1m"))


# --- last: they use up this client's rate-limit burst --------------------------------------------------------------

def test_gateway_rate_limits_each_key_and_another_key_from_the_same_address_passes(relat, gateway):
    """Keys relat does not know, so that what passes the gateway is relat's 401 (the model is never touched): one key
    sent far over its burst is refused at the edge, and a second key from the same address then still reaches relat.
    (Within the address's own, looser limit: 30 + 5 requests against its burst of 40.)"""
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        flooding = [client.get("/v1/models", headers={"Authorization": "Bearer sk-edge-flood"}) for _ in range(30)]
        assert {r.status_code for r in flooding} == {401, 429}, [r.status_code for r in flooding]
        refused = next(r for r in flooding if r.status_code == 429)
        error = assert_openai_error(refused, 429)
        assert error["code"] == "rate_limited" and refused.headers["retry-after"]
        other = [client.get("/v1/models", headers={"Authorization": "Bearer sk-edge-other"}) for _ in range(5)]
        assert [r.status_code for r in other] == [401] * 5, "the other key was limited with the first"
        # Leave the address's bucket refilled for the next test.
        assert poll(lambda: client.get("/v1/models", headers=AUTH).status_code == 200, 10)


def test_gateway_rate_limits_each_client_in_openai_shape(relat, gateway):
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=10) as client:
        responses = [client.get("/v1/models") for _ in range(40)]  # far over the burst, faster than the rate
        refused = [r for r in responses if r.status_code == 429]
        assert refused, "no request was rate limited"
        error = assert_openai_error(refused[0], 429)
        assert error["code"] == "rate_limited" and refused[0].headers["retry-after"]
        assert client.get("/health").status_code == 200, "probes are not rate limited"
        # Leave the bucket empty for whatever runs next.
        assert poll(lambda: client.get("/v1/models").status_code == 200, 10)
