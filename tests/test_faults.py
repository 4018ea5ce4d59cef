"""Faults are contained: a batch that runs out of memory (training, thinking or decoding) goes on as smaller
batches and only a row that fails alone fails; a request whose work raises leaks no adapter slot; and if the
engine's thread dies, /health turns 503 and the server is told to stop (`relat serve` then exits 1)."""

from __future__ import annotations

import httpx
import pytest
import torch
from relat_server.settings import Settings

import relat_core.engine.answering as engine_module
from relat_core import Engine
from relat_core.engine import _owner

from .conftest import build_tiny
from .server_support import chat, serve_in_thread, wait_for
from .test_batching import MIXED, assert_as_alone, drive


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    return Engine(build_tiny("qwen3", tokenizer), max_rank=16, num_slots=4, decode_share=0.0)


def out_of_memory_above(rows: int, real):
    """`real` (a phase or `extend`), raising CUDA's OutOfMemoryError for a batch of more than `rows` rows."""
    def phase(*args, **kwargs):
        batch = kwargs["input_ids"].shape[0] if "input_ids" in kwargs and kwargs["input_ids"] is not None \
            else len(args[0]) if isinstance(args[0], list) else args[1].batch_size
        if batch > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory: a batch of {batch}")
        return real(*args, **kwargs)
    return phase


def test_out_of_memory_batches_go_on_as_smaller_ones(engine, monkeypatch):
    """Every batched phase, and every forward of the decoding batch, runs out of memory above one row: each
    request still gets exactly its answer alone, and every slot comes back."""
    monkeypatch.setattr(engine.trainer, "run", out_of_memory_above(1, engine.trainer.run))
    monkeypatch.setattr(engine.thinker, "run", out_of_memory_above(1, engine.thinker.run))
    monkeypatch.setattr(engine_module, "extend", out_of_memory_above(2, engine_module.extend))
    outcomes = drive(engine, MIXED)
    monkeypatch.undo()
    for request_id, request in MIXED.items():
        assert_as_alone(engine, request, outcomes[request_id])
    assert engine.slots_in_use == 0 and not engine.has_unfinished_requests


def test_only_the_row_that_fails_alone_fails(engine, monkeypatch):
    """One request's decoding row always raises (out of memory, as CPU allocators say it): it alone fails, after
    its batch was fed again in halves; the others answer as alone."""
    real_extend, real_bind = engine_module.extend, engine._bind
    bound: list = []  # the rows of the last sub-batch bound: the rows a feed in halves extends

    def bind(rows, on):
        bound[:] = rows
        return real_bind(rows, on)

    def extend(model, state, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:  # a decoding forward, of the whole batch or of a part
            rows = engine.answerer.decoding.rows if engine.answerer.decoding.state is state else bound
            if any(_owner(row).request_id == "latent" for row in rows):
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory")
        return real_extend(model, state, **kwargs)

    monkeypatch.setattr(engine, "_bind", bind)
    monkeypatch.setattr(engine_module, "extend", extend)
    outcomes = drive(engine, MIXED)
    monkeypatch.undo()
    assert "out of memory" in str(outcomes["latent"].failed.error)
    for request_id in MIXED.keys() - {"latent"}:
        assert_as_alone(engine, MIXED[request_id], outcomes[request_id])
    assert engine.slots_in_use == 0 and not engine.has_unfinished_requests


def test_a_request_that_cannot_start_leaks_no_slot(engine, monkeypatch):
    def broken_reset(*args, **kwargs):
        raise RuntimeError("adapter initialisation broke")

    monkeypatch.setattr(engine.bank, "reset", broken_reset)
    with pytest.raises(RuntimeError, match="adapter initialisation broke"):
        engine.add_request("broken", MIXED["short-relat"])
    assert engine.slots_in_use == 0 and not engine.has_unfinished_requests


def test_the_engine_thread_dying_turns_health_503_and_stops_the_server(tokenizer):
    engine = Engine(build_tiny("qwen3", tokenizer, seed=3))
    with serve_in_thread(Settings(), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        service = served.app.state.service
        stopped = []
        service.on_fatal = lambda: stopped.append(True)

        def broken_forward(job, event):
            raise RuntimeError("the scheduler broke")

        service.runner._forward = broken_forward  # escapes the thread's loop: not one request's failure
        response = httpx.post(f"{served.url}/v1/chat/completions", json=chat(engine.name), timeout=60)
        assert response.status_code == 500
        wait_for(lambda: service.phase == "failed", "the failed phase")
        assert httpx.get(f"{served.url}/health").status_code == 503
        assert httpx.get(f"{served.url}/ready").status_code == 503
        assert stopped == [True]
        assert not service.runner._thread.is_alive()
