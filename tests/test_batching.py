"""Batched test-time training equals training alone (the model of issue 4's batched engine)."""

from __future__ import annotations

import pytest

from relat_core import Engine, Request, SamplingParams, TTTParams

from .conftest import base_checksum, build_tiny

MIXED = [
    Request([{"role": "user", "content": "Which planet is known as the red planet?"}],
            TTTParams(latent_steps=2, steps=3, lr=1e-2, rank=8), SamplingParams(seed=1)),
    Request([{"role": "system", "content": "Answer in one word."},
             {"role": "user", "content": "In which country would you find the ancient city of Petra, carved into "
                                         "rose-coloured rock?"}],
            TTTParams(latent_steps=5, steps=2, lr=5e-2, rank=4, targets=("q_proj", "v_proj", "up_proj"),
                      mapping="realign"), SamplingParams(seed=2)),
    Request([{"role": "user", "content": "Name a metal."}],
            TTTParams(latent_steps=3, steps=4, lr=2e-2, rank=16, residual_alpha=0.3, weight_decay=0.1),
            SamplingParams(seed=3)),
]


@pytest.mark.parametrize("architecture", ["qwen3", "qwen2"])
def test_batched_training_equals_each_request_alone(tokenizer, architecture):
    """Mixed prompt lengths, latent lengths, step counts, learning rates, ranks and targets in one batch (rows leave
    as they finish): every request sees the losses and gradient norms it sees when it runs alone."""
    engine = Engine(build_tiny(architecture, tokenizer), max_rank=16, num_slots=3)
    before = base_checksum(engine.model)
    together = engine.adapt(MIXED)
    for request, batched in zip(MIXED, together, strict=True):
        alone = engine.run(Request(request.messages, request.ttt, SamplingParams(max_tokens=1,
                                                                                 seed=request.sampling.seed)))
        assert len(batched.steps) == request.ttt.steps == len(alone.trace.steps)
        for got, want in zip(batched.steps, alone.trace.steps, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4, abs=1e-5)
    assert sorted(engine.bank.free) == [0, 1, 2]
    assert base_checksum(engine.model) == before


def test_a_row_that_stops_early_leaves_the_batch(tokenizer):
    engine = Engine(build_tiny("qwen3", tokenizer), max_rank=16, num_slots=2)
    stopping = Request(MIXED[0].messages, MIXED[0].ttt.replace(steps=5, stop_loss=1e6), SamplingParams(seed=1))
    traces = engine.adapt([stopping, MIXED[2]])
    assert traces[0].stopped_early and len(traces[0].steps) == 1
    alone = engine.adapt([MIXED[2]])[0]
    assert [s["loss"] for s in traces[1].steps] == pytest.approx([s["loss"] for s in alone.steps], rel=1e-4)
