"""Load, cancellation, deadlines and shutdown, for real: a full queue gives 429, a passed deadline 504, a client that
goes away stops its request's training at the next step and frees its slot, and SIGTERM drains `relat serve`.

Slow requests are made slow by their own work (many training steps over long latent thoughts on the tiny model),
never by sleeping; every wait is on an observable state (a progress line, a metric), never on a duration.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import torch
from relat_server.cli import main
from relat_server.settings import Settings

from relat_core import Engine

from .conftest import build_tiny, save_tiny
from .server_support import (
    AUTH,
    KEY,
    SLOW,
    assert_error,
    chat,
    data_events,
    free_port,
    metrics,
    sample,
    serve_in_thread,
    sse_lines,
    wait_for,
)


@pytest.fixture(scope="module")
def engine(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(build_tiny("qwen3", tokenizer, seed=2))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(engine):
    with serve_in_thread(Settings(api_keys=[KEY], max_concurrency=1, max_queue=1), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        served.model = engine.name
        served.http = httpx.Client(base_url=served.url, headers=AUTH, timeout=120)
        yield served


def idle(url: str) -> dict:
    """Metrics once nothing runs or waits (the worker has let go of every request)."""
    def settled():
        values = metrics(url)
        quiet = sample(values, "relat_requests_running") == sample(values, "relat_requests_waiting") == 0
        return values if quiet else None

    return wait_for(settled, "the server to be idle")


def grew(before: dict, after: dict, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def until_training(lines) -> str:
    """Read a chat stream up to its first training-progress comment; returns that line."""
    return next(line for line in lines if line.startswith(": ttt step"))


def test_a_full_queue_answers_429_with_retry_after(server):
    before = idle(server.url)
    slow = chat(server, relat=SLOW, stream=True)
    with server.http.stream("POST", "/v1/chat/completions", json=slow) as running:
        lines = sse_lines(running)  # kept: dropping a half-read stream would close it, and cancel the request
        until_training(lines)  # the first request holds the engine
        with server.http.stream("POST", "/v1/chat/completions", json=slow) as queued:
            assert queued.status_code == 200  # admitted: it waits in the queue of one
            wait_for(lambda: sample(metrics(server.url), "relat_requests_waiting") == 1, "the second to queue")
            refused = server.http.post("/v1/chat/completions", json=chat(server))
            assert_error(refused, 429, "queue_full")
            assert int(refused.headers["retry-after"]) >= 1
            native = server.http.post("/v1/relat", json={"question": "q"})
            assert_error(native, 429, "queue_full")
    after = idle(server.url)  # leaving both streams cancelled both requests
    assert grew(before, after, "relat_requests_total", method="relat", outcome="rejected") == 2
    assert grew(before, after, "relat_requests_total", method="relat", outcome="cancelled") == 2
    assert grew(before, after, "relat_errors_total", code="429") == 2


def test_a_queued_request_whose_deadline_passed_gives_up_its_place(server):
    """A request that expired in the queue no longer counts against it, though the engine has not looked at the
    queue since (it is inside a long step): the next request is queued, not refused with a 429."""
    before = idle(server.url)
    with server.http.stream("POST", "/v1/chat/completions", json=chat(server, relat=SLOW, stream=True)) as running:
        until_training(sse_lines(running))  # the first request holds the engine; the queue has one place
        for _ in range(2):  # the second is admitted only if the first left the queue when its deadline passed
            expired = server.http.post("/v1/chat/completions", json=chat(server, relat={**SLOW, "timeout": 0.3}))
            assert_error(expired, 504, "deadline_exceeded")
        assert sample(metrics(server.url), "relat_requests_waiting") == 0
    after = idle(server.url)
    assert grew(before, after, "relat_requests_total", method="relat", outcome="timeout") == 2
    assert grew(before, after, "relat_requests_total", method="relat", outcome="rejected") == 0


def test_a_disconnect_mid_training_cancels_the_work_and_frees_the_slot(server):
    before = idle(server.url)
    with server.http.stream("POST", "/v1/chat/completions", json=chat(server, relat=SLOW, stream=True)) as response:
        lines = sse_lines(response)
        assert until_training(lines).startswith(": ttt step 1/100 loss ")
        assert next(lines).startswith(": ttt step 2/100")
    after = idle(server.url)
    assert grew(before, after, "relat_requests_total", method="relat", outcome="cancelled") == 1
    assert grew(before, after, "relat_requests_total", method="relat", outcome="success") == 0
    steps_run = grew(before, after, "relat_ttt_steps_run_total")
    assert 2 <= steps_run < SLOW["steps"]  # stopped at the next step, not after all of them
    assert sample(after, "relat_adapter_slots_in_use") == 0
    assert grew(before, after, "relat_ttt_steps_count") == 0  # no finished-request trace was recorded
    # The slot is back: the next training request gets it and runs all its steps.
    result = server.http.post("/v1/chat/completions", json=chat(server)).json()
    assert len(result["relat"]["steps"]) == 2


def test_a_disconnect_without_streaming_cancels_too(server):
    before = idle(server.url)
    body = json.dumps(chat(server, relat=SLOW)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: relat\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: grew(before, metrics(server.url), "relat_ttt_steps_run_total") >= 1, "training to start")
    after = idle(server.url)
    assert grew(before, after, "relat_requests_total", method="relat", outcome="cancelled") == 1
    assert grew(before, after, "relat_ttt_steps_run_total") < SLOW["steps"]
    assert sample(after, "relat_adapter_slots_in_use") == 0


def test_a_passed_deadline_is_a_504(server):
    before = idle(server.url)
    assert_error(server.http.post("/v1/chat/completions", json=chat(server, relat={**SLOW, "timeout": 0.5})), 504,
                 "deadline_exceeded")
    with server.http.stream("POST", "/v1/chat/completions",
                            json=chat(server, relat={**SLOW, "timeout": 0.5}, stream=True)) as response:
        assert response.status_code == 200
        events = data_events(sse_lines(response))
    assert events[-2]["error"]["code"] == "deadline_exceeded" and events[-1] == "[DONE]"
    with server.http.stream("POST", "/v1/relat", json={"question": "q", **SLOW, "timeout": 0.5,
                                                        "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = list(sse_lines(response))
    assert lines[-2] == "event: error" and json.loads(lines[-1][6:])["status"] == 504
    after = idle(server.url)
    assert grew(before, after, "relat_requests_total", method="relat", outcome="timeout") == 3
    assert grew(before, after, "relat_errors_total", code="504") == 3
    assert grew(before, after, "relat_ttt_steps_run_total") < SLOW["steps"]


def test_a_drain_that_times_out_cancels_what_is_left_with_an_error_event(engine):
    with serve_in_thread(Settings(drain_timeout=0.5), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        http = httpx.Client(base_url=served.url, timeout=120)
        with http.stream("POST", "/v1/chat/completions", json=chat(engine.name, relat=SLOW, stream=True)) as response:
            lines = sse_lines(response)
            until_training(lines)
            drained = asyncio.run_coroutine_threadsafe(served.app.state.service.drain(), served.loop)
            events = data_events(lines)
        drained.result(120)
        assert events[-2]["error"]["code"] == "cancelled" and events[-1] == "[DONE]"
        assert httpx.get(f"{served.url}/ready").status_code == 503
        assert_error(http.post("/v1/chat/completions", json=chat(engine.name)), 503, "not_ready")
        after = metrics(served.url)
        assert sample(after, "relat_requests_total", method="relat", outcome="cancelled") == 1
        assert sample(after, "relat_ttt_steps_run_total") < SLOW["steps"]


# -- `relat serve` in its own process: settings from the environment, SIGTERM drains ---------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", tokenizer, seed=3)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RELAT_API_KEYS": f"sk-other,{KEY}", "RELAT_TORCH_THREADS": "1", "RELAT_DEVICE": "cpu",
           "RELAT_SERVED_MODEL_NAME": "tiny", "RELAT_STEPS": "3"}
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "relat_server", "serve", "--model", str(model_dir),
                                "--port", str(port), "--drain-timeout", "300"], env=env, stdout=log, stderr=log)

    def ready() -> bool:
        assert process.poll() is None, "relat serve exited early"
        try:
            return httpx.get(f"{url}/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "relat serve to become ready", limit=300)
        http = httpx.Client(base_url=url, headers=AUTH, timeout=300)
        plain = http.post("/v1/chat/completions", json=chat("tiny", relat={"latent_steps": 2})).json()
        assert len(plain["relat"]["steps"]) == 3  # RELAT_STEPS is the server's default
        in_flight = chat("tiny", stream=True, relat={"steps": 20, "latent_steps": 16})
        with http.stream("POST", "/v1/chat/completions", json=in_flight) as response:
            lines = sse_lines(response)
            until_training(lines)
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, "draining")
            assert_error(http.post("/v1/chat/completions", json=chat("tiny")), 503, "not_ready")
            assert httpx.get(f"{url}/health").status_code == 200
            events = data_events(lines)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert len(events[-2]["relat"]["steps"]) == 20  # it ran to the end
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.seek(0)
        print(log.read())
        log.close()


def test_relat_serve_rejects_bad_settings_without_echoing_secrets(monkeypatch, capsys):
    monkeypatch.setenv("RELAT_API_KEYS", "sk-very-secret")
    assert main(["serve", "--max-queue", "-1"]) == 2
    assert main(["serve", "--steps", "1000"]) == 2
    output = capsys.readouterr()
    assert "max_queue" in output.err and "steps must be an integer" in output.err
    assert "sk-very-secret" not in output.err + output.out
