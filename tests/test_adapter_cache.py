"""The adapter cache (relat_core/adapter_cache.py) in the engine, on a tiny random Qwen3: a hit skips training and
answers as the miss did; every option that shapes the training misses, options that shape only the answer hit;
abandoned, failed and cancelled training is never cached; LRU bounds by count and bytes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from relat_core import Engine, Request, SamplingParams, TrainStep, TTTParams
from relat_core.adapter_cache import AdapterCache, CachedAdapter

from .conftest import build_tiny

QUESTION = [{"role": "user", "content": "Which planet is known as the red planet?"}]
TRAIN = TTTParams(method="relat", latent_steps=3, steps=2, lr=2e-2, rank=4)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def loaded(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny("qwen3", tokenizer, seed=5)
    torch.set_num_threads(threads)


@pytest.fixture
def engine(loaded) -> Engine:
    """A fresh engine with a cache of 32 entries, 64 MB, per test (the model's slots are rebuilt with it)."""
    engine = Engine(loaded, max_rank=8, num_slots=2, adapter_cache=AdapterCache(max_entries=32, max_bytes=64 << 20))
    yield engine
    for layer in engine.bank.layers:  # unhook, so that the next test's engine is the only one on the model
        layer.handle.remove()


def run(engine: Engine, messages=QUESTION, ttt: TTTParams = TRAIN, sampling: SamplingParams = GREEDY):
    events = list(engine.generate(Request(messages, ttt, sampling)))
    return events[-1].result, [e for e in events if isinstance(e, TrainStep)]


def test_a_hit_skips_training_and_answers_as_the_miss_did(engine):
    miss, miss_steps = run(engine)
    assert miss.trace.cache == "miss" and len(miss_steps) == 2 and len(engine.adapter_cache) == 1
    hit, hit_steps = run(engine)
    assert hit.trace.cache == "hit" and hit_steps == []  # no training step ran
    assert hit.token_ids == miss.token_ids and hit.text == miss.text
    assert hit.trace.steps == miss.trace.steps  # the losses recorded when the adapter was trained
    assert hit.trace.recon_loss_before == miss.trace.recon_loss_before
    assert math.isclose(hit.trace.recon_loss_after, miss.trace.recon_loss_after, rel_tol=1e-5)
    assert hit.trace.timings["train_s"] < miss.trace.timings["train_s"]
    assert (engine.adapter_cache.stats.hits, engine.adapter_cache.stats.misses) == (1, 1)
    assert sorted(engine.bank.free) == [0, 1]


def test_sampling_on_a_hit_draws_as_the_miss_did(engine):
    sampling = SamplingParams(max_tokens=8, temperature=0.9, seed=11)
    miss, _ = run(engine, sampling=sampling)
    hit, _ = run(engine, sampling=sampling)
    assert hit.trace.cache == "hit" and hit.token_ids == miss.token_ids


@pytest.mark.parametrize("change", [
    {"steps": 3}, {"latent_steps": 2}, {"lr": 1e-2}, {"rank": 2}, {"alpha": 8.0}, {"targets": ("q_proj",)},
    {"stop_loss": 0.5}, {"max_grad_norm": 0.5}, {"weight_decay": 0.1}, {"mapping": "none"},
    {"residual_alpha": 0.5}, {"follow_up": "bridge"}, {"reconstruction_instruction": "Say the question again."},
    {"agents": "sequential"}, {"answer_format": "boxed"}, {"messages": [{"role": "user", "content": "Why?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, *QUESTION]}, {"seed": 3},
])
def test_changing_what_shapes_the_training_misses(engine, change):
    run(engine)
    change = dict(change)
    messages = change.pop("messages", QUESTION)
    sampling = dataclasses.replace(GREEDY, seed=change.pop("seed")) if "seed" in change else GREEDY
    result, steps = run(engine, messages, TRAIN.replace(**change), sampling)
    assert result.trace.cache == "miss" and steps


@pytest.mark.parametrize("change", [
    {"guidance": 0.5}, {"answer_context": "question"}, {"adapter_during_answer": True}, {"contrastive_eta": 0.5},
    {"max_tokens": 3}, {"temperature": 0.7}, {"stop": ("a",)},
])
def test_what_shapes_only_the_answer_hits(engine, change):
    run(engine)
    sampling_fields = {k: v for k, v in change.items() if k in ("max_tokens", "temperature", "stop")}
    ttt = TRAIN.replace(**{k: v for k, v in change.items() if k not in sampling_fields})
    result, steps = run(engine, ttt=ttt, sampling=dataclasses.replace(GREEDY, **sampling_fields))
    assert result.trace.cache == "hit" and not steps


def test_cache_false_neither_reads_nor_writes(engine):
    result, _ = run(engine, ttt=TRAIN.replace(cache=False))
    assert result.trace.cache is None and len(engine.adapter_cache) == 0
    run(engine)
    result, steps = run(engine, ttt=TRAIN.replace(cache=False))
    assert result.trace.cache is None and steps


def test_nothing_is_cached_without_a_cache_or_without_training(loaded):
    engine = Engine(loaded, max_rank=8, num_slots=1)
    try:
        assert run(engine)[0].trace.cache is None and run(engine)[0].trace.cache is None
    finally:
        for layer in engine.bank.layers:
            layer.handle.remove()


def test_an_abandoned_update_is_never_cached(engine, monkeypatch):
    real = engine._reconstruction

    def non_finite(rows, state, scored=None):
        return real(rows, state, scored) * float("nan")

    monkeypatch.setattr(engine, "_reconstruction", non_finite)
    result, _ = run(engine)
    assert result.trace.aborted and len(engine.adapter_cache) == 0
    monkeypatch.undo()
    assert run(engine)[0].trace.cache == "miss"


def test_a_request_cancelled_or_failed_while_training_is_never_cached(engine, monkeypatch):
    stream = engine.generate(Request(QUESTION, TRAIN.replace(steps=3), GREEDY))
    assert isinstance(next(stream), TrainStep)
    stream.close()  # cancelled after its first step
    assert len(engine.adapter_cache) == 0 and sorted(engine.bank.free) == [0, 1]

    def failing(rows):
        raise RuntimeError("injected")

    monkeypatch.setattr(engine.trainer, "run", failing)
    with pytest.raises(RuntimeError):
        run(engine)
    assert len(engine.adapter_cache) == 0


def test_least_recently_used_goes_first_by_count_and_by_bytes():
    def entry(nbytes: int) -> CachedAdapter:
        return CachedAdapter([(torch.zeros(nbytes // 4), torch.zeros(0))], [], 1, None, False, None)

    cache = AdapterCache(max_entries=2, max_bytes=1000)
    cache.put("a", entry(400))
    cache.put("b", entry(400))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", entry(400))  # past the count: b goes
    assert "b" not in cache and "a" in cache and "c" in cache
    cache.put("d", entry(800))  # past the bytes: a and c go
    assert list(cache._entries) == ["d"] and cache.stats.bytes == 800 and cache.stats.evictions == 3
    cache.put("e", entry(2000))  # larger than the whole cache: not stored
    assert "e" not in cache
    assert not AdapterCache(max_entries=0, max_bytes=1000).enabled

