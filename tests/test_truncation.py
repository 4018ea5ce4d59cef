"""Truncated backpropagation through the latent thought (`backprop_latent_steps`, issue 15): the gradient crosses
only the thought's last k latent steps. Alone (or in a batch where every row is before its cut) the positions before
the cut run without a graph; in a mixed batch they run with the others and are detached at the cut. Both must give
the same training, so each truncated request batched with others gets exactly what it gets alone."""

from __future__ import annotations

import pytest
import torch

from relat_core import Engine, Request, SamplingParams, TTTParams
from relat_core.latent import SequenceState, Truncation, extend, latent_rollout
from relat_core.loading import weights_digest

from .conftest import build_tiny
from .test_batching import assert_as_alone, drive

QUESTION = [{"role": "user", "content": "Which planet is known as the red planet?"}]
METAL = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a metal."}]
SAMPLING = SamplingParams(max_tokens=4)


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    return Engine(build_tiny(request.param, tokenizer), max_rank=16, num_slots=4, decode_share=0.0)


def losses(engine: Engine, **ttt) -> list[float]:
    result = engine.run(Request(QUESTION, TTTParams(steps=3, lr=5e-2, cache=False, **ttt), SAMPLING))
    return [step["loss"] for step in result.trace.steps]


def test_truncation_changes_the_update_and_a_cut_past_the_thought_changes_nothing(engine):
    full = losses(engine, latent_steps=4)
    assert losses(engine, latent_steps=4, backprop_latent_steps=4) == full  # the last 4 of 4: all of it
    assert losses(engine, latent_steps=4, backprop_latent_steps=9) == full
    truncated = losses(engine, latent_steps=4, backprop_latent_steps=1)
    assert truncated[0] == full[0]  # the same loss before any update
    assert truncated[1:] != pytest.approx(full[1:], rel=1e-6)  # a different gradient, so a different update


def test_the_gradient_is_that_of_the_last_latent_steps_alone(engine):
    """Independent of the engine: the thought's prompt and first L - k latent steps computed with no graph at all,
    then the last k with one; the slot's gradient must equal the engine's truncated one."""
    model, bank = engine.model, engine.bank
    ids = torch.tensor([engine.chat.segments(QUESTION, TTTParams().reconstruction_instruction, "restate",
                                              latent=True).prompt_ids])
    params = [TTTParams(latent_steps=5, backprop_latent_steps=2)]
    slot = bank.acquire()
    try:
        bank.reset(slot, 8, ("q_proj", "v_proj"), torch.Generator().manual_seed(0))
        for layer in bank.layers:  # a nonzero B, so that the gradient reaches A too
            with torch.no_grad():
                layer.B[slot].normal_(0, 0.02, generator=torch.Generator().manual_seed(1))

        def gradient(reference: bool) -> list[torch.Tensor]:
            bank.zero_grad()
            state = SequenceState.empty(model, 1, engine.device)
            with bank.bind([slot], [2.0], ("q_proj", "v_proj"), 8):
                if reference:
                    with torch.no_grad():
                        hidden = extend(model, state, input_ids=ids)[:, -1]
                        hidden = latent_rollout(model, state, hidden, [3], engine.latent_map, params)
                    hidden = latent_rollout(model, state, hidden, [2], engine.latent_map, params)
                else:
                    truncation = Truncation.of(params, [5])
                    with truncation.forward([0]):
                        hidden = extend(model, state, input_ids=ids)[:, -1]
                    hidden = latent_rollout(model, state, hidden, [5], engine.latent_map, params,
                                            truncation=truncation)
                (model.get_output_embeddings()(hidden).float().logsumexp(-1)).sum().backward()
            return [t.grad[slot].clone() for t in bank.parameters() if t.grad is not None]

        reference, engine_gradient = gradient(True), gradient(False)
        assert reference and len(reference) == len(engine_gradient)
        for expected, got in zip(reference, engine_gradient, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    finally:
        bank.zero_grad()
        bank.release(slot)


TRUNCATED = {
    "cut-2-of-4": Request(QUESTION, TTTParams(latent_steps=4, steps=2, lr=5e-2, backprop_latent_steps=2, cache=False),
                          SAMPLING),
    "full": Request(METAL, TTTParams(latent_steps=4, steps=3, lr=5e-2, cache=False), SAMPLING),
    # Residual mixing carries the previous latent input across the cut: it must be cut there too.
    "cut-1-of-3": Request(METAL, TTTParams(latent_steps=3, steps=2, lr=2e-2, backprop_latent_steps=1, rank=4,
                                           residual_alpha=0.5, cache=False),
                          SamplingParams(max_tokens=5, seed=3, temperature=0.7)),
    # Three latent agents of 2 steps each: the cut falls inside the second agent's steps, before the third's turn.
    "agents-cut-3-of-6": Request(QUESTION, TTTParams(latent_steps=2, steps=2, lr=5e-2, agents="sequential",
                                                     backprop_latent_steps=3, agent_max_tokens=4, cache=False),
                                 SAMPLING),
    "direct": Request(QUESTION, TTTParams(method="direct", backprop_latent_steps=2), SAMPLING),
}


def test_truncated_requests_batched_with_others_get_what_they_get_alone(engine):
    before = weights_digest(engine.model)
    first = {name: TRUNCATED[name] for name in ("cut-2-of-4", "full", "agents-cut-3-of-6")}
    outcomes = drive(engine, first, joining={1: {"cut-1-of-3": TRUNCATED["cut-1-of-3"],
                                                 "direct": TRUNCATED["direct"]}})
    for name, request in TRUNCATED.items():
        assert_as_alone(engine, request, outcomes[name])
    assert sorted(engine.bank.free) == [0, 1, 2, 3] and weights_digest(engine.model) == before
