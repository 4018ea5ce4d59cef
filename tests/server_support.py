"""Helpers for the server tests: a real uvicorn server on 127.0.0.1 (in a thread, or `relat serve` in a process),
metrics read back through prometheus-client's own parser, and waiting on a condition without asserting timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import httpx
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from relat_server.app import create_app
from relat_server.settings import Settings

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
QUICK = {"steps": 2, "latent_steps": 2}  # a full relat request in a fraction of a second
# Enough work per request on the tiny model to outlast any check made while it runs (about a minute on one
# core): a slow request is made of many training steps with long latent thoughts, never of sleeps, and it trains
# every time (an adapter cache would answer a repeated one without training).
SLOW = {"steps": 100, "latent_steps": 64, "cache": False}


def wait_for(condition: Callable[[], object], what: str, limit: float = 120.0) -> object:
    """Poll until `condition()` is truthy; the limit only turns a hang into a failure, it measures nothing."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def bound_socket() -> socket.socket:
    """A listening-ready socket on a free port; handing it to uvicorn avoids a race for the port number."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with contextlib.closing(bound_socket()) as sock:
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(settings: Settings, load_engine: Callable) -> Iterator[SimpleNamespace]:
    """A uvicorn server running `create_app(settings, load_engine)` until the block ends: its url, app and event
    loop (to run the app's coroutines, such as a drain, where they belong)."""
    app = create_app(settings, load_engine=load_engine)
    sock = bound_socket()
    loop = asyncio.new_event_loop()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(sockets=[sock]),), daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", app=app, loop=loop)
    finally:
        server.should_exit = True
        thread.join(30)
        loop.close()
        sock.close()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread while the block runs: the tiny model is faster on one, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def ready_server(engine, **settings) -> Iterator[SimpleNamespace]:
    """serve_in_thread on `engine` with the test key (and these settings), once /ready answers 200; with the
    model's name and an httpx client that sends the key."""
    with serve_in_thread(Settings(**{"api_keys": [KEY], **settings}), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        served.model = engine.name
        served.http = httpx.Client(base_url=served.url, headers=AUTH, timeout=120)
        yield served


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels), parsed by prometheus-client."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """Non-empty lines of an event stream, comments included."""
    for line in response.iter_lines():
        if line:
            yield line


def chat(server_or_model, **fields) -> dict:
    model = getattr(server_or_model, "model", server_or_model)
    return {"model": model, "messages": QUESTION, "max_completion_tokens": 8, "temperature": 0, "relat": QUICK,
            **fields}


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("x-request-id")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def data_events(lines) -> list:
    """The `data:` payloads of an event stream, parsed, and "[DONE]"."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]
