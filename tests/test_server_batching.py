"""The server batches requests (`max_concurrency`), and what ends one request early (its deadline, its client
going away) leaves the others in the batch with the answers they get alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from relat_server.settings import Settings

from relat_core import Engine
from relat_core.loading import weights_digest

from .conftest import build_tiny
from .server_support import AUTH, SLOW, assert_error, chat, metrics, sample, serve_in_thread, sse_lines, wait_for

CONCURRENCY = 4


@pytest.fixture(scope="module")
def engine(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(build_tiny("qwen3", tokenizer, seed=3), max_rank=16, num_slots=CONCURRENCY)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(engine):
    with serve_in_thread(Settings(max_concurrency=CONCURRENCY, max_queue=8), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        served.model = engine.name
        served.http = httpx.Client(base_url=served.url, headers=AUTH, timeout=120)
        yield served


@pytest.fixture
def batch_sizes(engine, monkeypatch) -> list[int]:
    """How many requests the engine held at each of its steps, recorded while the test runs."""
    sizes = []
    real_step = engine.step

    def recording_step():
        sizes.append(engine.num_unfinished_requests)
        return real_step()

    monkeypatch.setattr(engine, "step", recording_step)
    return sizes


def answer(server, body: dict) -> tuple[str, list[float]]:
    reply = server.http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    return result["choices"][0]["message"]["content"], [s["loss"] for s in result.get("relat", {}).get("steps", [])]


def test_requests_run_as_one_batch_and_one_ending_early_disturbs_no_other(server, engine, batch_sizes):
    """Three requests that finish, one whose deadline passes mid-training (504) and one whose client goes away
    mid-training run in one batch; the three get exactly the answers and losses they get alone."""
    bodies = [chat(server, seed=1, temperature=0.8, relat={"steps": 3, "latent_steps": 4}),
              chat(server, relat={"steps": 2, "latent_steps": 2, "adapter_during_answer": True},
                   max_completion_tokens=12),
              chat(server, relat={"method": "direct"}, max_completion_tokens=5)]
    checksum = weights_digest(engine.model)
    alone = [answer(server, body) for body in bodies]

    left = threading.Event()

    def leaving_client():
        with server.http.stream("POST", "/v1/chat/completions", json=chat(server, relat=SLOW, stream=True)) as stream:
            lines = sse_lines(stream)
            next(line for line in lines if line.startswith(": ttt step 2/"))
        left.set()

    def expiring():
        return server.http.post("/v1/chat/completions", json=chat(server, relat={**SLOW, "timeout": 1.0}))

    with ThreadPoolExecutor(5) as pool:
        leaver = pool.submit(leaving_client)
        expired = pool.submit(expiring)
        wait_for(lambda: engine.num_unfinished_requests == 2, "the two slow requests to start")
        together = list(pool.map(lambda body: answer(server, body), bodies))
        leaver.result()
        assert_error(expired.result(), 504, "deadline_exceeded")
    assert [text for text, _ in together] == [text for text, _ in alone]
    for (_, got), (_, want) in zip(together, alone, strict=True):
        assert got == pytest.approx(want, rel=1e-5)  # fp32 sums in another order: equal to rounding
    assert left.is_set() and max(batch_sizes) >= 3, batch_sizes  # a slow request and quick ones, batched
    wait_for(lambda: sample(metrics(server.url), "relat_requests_running") == 0, "the server to be idle")
    assert engine.slots_in_use == 0 and not engine.has_unfinished_requests
    assert weights_digest(engine.model) == checksum


def test_a_burst_on_an_idle_server_starts_as_one_batch(engine, batch_sizes):
    """Requests that arrive within the batch window of an idle engine take their first step together."""
    with serve_in_thread(Settings(max_concurrency=3, batch_window=1.0), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        with httpx.Client(base_url=served.url, timeout=120) as http, ThreadPoolExecutor(3) as pool:
            def ask(seed: int) -> httpx.Response:
                return http.post("/v1/chat/completions", json=chat(engine.name, seed=seed))

            first = pool.submit(ask, 1)
            wait_for(lambda: sample(metrics(served.url), "relat_requests_waiting") == 1, "the first to wait")
            others = [pool.submit(ask, seed) for seed in (2, 3)]
            replies = [first.result(), *(other.result() for other in others)]
    assert [reply.status_code for reply in replies] == [200, 200, 200]
    assert batch_sizes[0] == 3, batch_sizes
