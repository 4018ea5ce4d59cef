"""Several relat replicas behind the project's gateway: three `relat serve` processes on a tiny model, each with one
slot and no queue (a second concurrent request is refused with 429 at once), behind nginx running
deploy/nginx/nginx.conf with the three as its upstream (deploy_support.gateway_config).

What is checked: least_conn spreads concurrent requests; a request refused with 429 or 503, or whose replica is
gone, is retried on another replica; a stream that began is never retried. Which replica did what is read from each
replica's own /metrics, not inferred from timing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import save_tiny
from .deploy_support import Service, gateway_service, tool
from .server_support import free_port

REPLICAS = 3
BUSY = {"steps": 20, "latent_steps": 8, "cache": False}  # seconds of training on the tiny model, every time


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", tokenizer, seed=0)


@pytest.fixture(scope="module")
def replicas(model_dir, tmp_path_factory):
    """Three relat serve processes, started together; one thread each, so that they share 2 cores fairly."""
    env = {**os.environ, "RELAT_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    services = []
    with contextlib.ExitStack() as stack:
        for index in range(REPLICAS):
            port = free_port()
            command = [tool("relat"), "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                       "--max-concurrency", "1", "--max-queue", "0", "--drain-timeout", "60",
                       "--torch-threads", "1"]
            service = Service(f"relat-{index}", command, tmp_path_factory.mktemp(f"relat{index}") / "relat.log",
                              env=env)
            service.port = port
            services.append(service)
        for service in services:
            stack.enter_context(service.serving(f"http://127.0.0.1:{service.port}", "/ready", 180, "readiness"))
        model = httpx.get(f"{services[0].url}/v1/models", timeout=5).json()["data"][0]["id"]
        for service in services:
            service.model = model
        yield services


@pytest.fixture(scope="module")
def gateway(replicas, tmp_path_factory):
    with gateway_service([r.port for r in replicas], free_port(), tmp_path_factory.mktemp("nginx")) as service:
        yield service


# --- helpers -------------------------------------------------------------------------------------------------------

def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Count from one to ten."}], **extra}


def slow(model: str, **extra) -> dict:
    """Seconds of test-time training on the tiny model before the first token."""
    return chat(model, max_completion_tokens=4, relat=BUSY, **extra)


def counts(replica) -> dict[str, float]:
    """This replica's requests handled (any outcome, refusals included), refusals by status, and requests running."""
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    result = {"requests": 0.0, "429": 0.0, "503": 0.0, "running": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "relat_requests_total":
                result["requests"] += sample.value
            elif sample.name == "relat_errors_total" and sample.labels["code"] in ("429", "503"):
                result[sample.labels["code"]] += sample.value
            elif sample.name == "relat_requests_running":
                result["running"] = sample.value
    return result


def received(replica) -> float:
    """Every request that reached this replica's engine or was refused by it."""
    c = counts(replica)
    return c["requests"] + c["503"]


def ok(replica) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "relat_requests_total" and sample.labels.get("outcome") == "success")


def in_threads(*calls) -> list:
    """Run the calls at once; their results in order."""
    results = [None] * len(calls)

    def run(i, call):
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    return threads, results


def join(threads) -> None:
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)


def post(url: str, body: dict, request_id: str | None = None) -> httpx.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def wait_running(replica, n: float = 1) -> None:
    deadline = time.monotonic() + 30
    while counts(replica)["running"] < n:
        assert time.monotonic() < deadline, f"{replica.name} never started its request"
        time.sleep(0.1)


def log_line(gateway, request_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [line for line in gateway.output().splitlines() if f"id={request_id}" in line]
        if lines:
            return lines[-1]
        time.sleep(0.1)
    pytest.fail(f"no access log line for {request_id}:\n{gateway.output()[-2000:]}")


# --- the tests, in order: the last two stop replicas ---------------------------------------------------------------

def test_concurrent_slow_requests_are_spread_over_the_replicas(replicas, gateway):
    model = replicas[0].model
    before = [ok(r) for r in replicas]
    threads, results = in_threads(*[lambda i=i: post(gateway.url, slow(model), f"spread-{i}") for i in range(3)])
    join(threads)
    assert [r.status_code for r in results] == [200] * 3, [r.text for r in results]
    # One slot each and no queue: however nginx first placed them, each replica served exactly one.
    assert [ok(r) - b for r, b in zip(replicas, before, strict=True)] == [1, 1, 1]


def test_a_request_refused_with_429_is_retried_on_another_replica(replicas, gateway):
    model = replicas[0].model
    busy, free = replicas[:2], replicas[2]
    # Fill two replicas' only slot directly, behind the gateway's back: least_conn sees them idle and tries them.
    threads, results = in_threads(*[lambda r=r: post(r.url, slow(model)) for r in busy])
    for replica in busy:
        wait_running(replica)
    refused_before = sum(counts(r)["429"] for r in busy)
    served_before = ok(free)
    for i in range(3):
        response = post(gateway.url, chat(model, max_completion_tokens=2), f"retry429-{i}")
        assert response.status_code == 200, response.text
    assert ok(free) - served_before == 3
    # Of three requests taken in turn among three equally idle replicas, the busy two were tried first at least once.
    assert sum(counts(r)["429"] for r in busy) > refused_before
    assert any("429" in log_line(gateway, f"retry429-{i}") for i in range(3)), gateway.output()[-2000:]
    join(threads)
    assert [r.status_code for r in results] == [200, 200]


def test_a_draining_or_stopped_replica_is_skipped(replicas, gateway):
    model = replicas[0].model
    leaving = replicas[0]
    # A request in flight keeps the replica draining (503 to new requests) until it is done.
    threads, results = in_threads(lambda: post(leaving.url, slow(model)))
    wait_running(leaving)
    leaving.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{leaving.url}/ready", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "SIGTERM did not start the drain"
        time.sleep(0.1)
    refused_before = counts(leaving)["503"]
    for i in range(3):
        response = post(gateway.url, chat(model, max_completion_tokens=2), f"drain-{i}")
        assert response.status_code == 200, response.text
    assert counts(leaving)["503"] > refused_before, "the draining replica was never tried"
    join(threads)
    assert results[0].status_code == 200, "the drain lets the request in flight finish"
    leaving.process.wait(timeout=30)
    # Gone: a refused connection, retried on another replica.
    for i in range(3):
        response = post(gateway.url, chat(model, max_completion_tokens=2), f"gone-{i}")
        assert response.status_code == 200, response.text


def test_a_stream_that_began_is_never_retried(replicas, gateway):
    model = replicas[0].model
    alive = [r for r in replicas if r.process.poll() is None]
    assert len(alive) == 2
    before = {r.name: received(r) for r in alive}
    body = chat(model, stream=True, max_completion_tokens=400, temperature=1.0, relat={"steps": 1})
    lines, error = [], None
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body,
                           headers={"X-Request-Id": "stream-cut"}) as response:
            assert response.status_code == 200
            try:
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) == 5:  # the stream began: kill the replica serving it
                        serving = [r for r in alive if counts(r)["running"] >= 1]
                        assert len(serving) == 1, [counts(r) for r in alive]
                        serving[0].process.kill()
                        serving[0].process.wait(timeout=10)
            except httpx.HTTPError as exc:  # the cut connection: the chunked body never ends properly
                error = exc
    assert len(lines) >= 5
    assert error is not None or "data: [DONE]" not in lines, "the client must see the stream cut"
    other = next(r for r in alive if r is not serving[0])
    time.sleep(1)  # a retry, if nginx made one, would have reached the other replica by now
    assert received(other) == before[other.name], "the stream was replayed on another replica"
    # The gateway's own record: one replica tried, the one that was killed.
    assert f'replicas="127.0.0.1:{serving[0].port}"' in log_line(gateway, "stream-cut")
