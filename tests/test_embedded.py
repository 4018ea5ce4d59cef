"""End to end on the embedded SmolLM2-135M-Instruct: the loop, the masking that makes it real, isolation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from relat_core import Request, SamplingParams, TTTParams
from relat_core.latent import SequenceState, extend, latent_rollout
from relat_core.loading import weights_digest

from .conftest import train_alone

pytestmark = pytest.mark.slow

GOLD = [{"role": "user", "content": "What is the chemical symbol for gold?"}]


def test_relat_end_to_end(smol_engine):
    before = weights_digest(smol_engine.model)
    result = smol_engine.run(Request(GOLD, smol_engine.defaults.replace(method="relat", steps=3, stop_loss=None),
                                     SamplingParams(max_tokens=24)))
    losses = [step["loss"] for step in result.trace.steps]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.trace.recon_loss_after < result.trace.recon_loss_before
    assert result.trace.aborted is None
    assert result.text.strip() and result.finish_reason in ("stop", "length")
    assert weights_digest(smol_engine.model) == before


def _first_latent_gradient(engine, sequence) -> float:
    """Gradient norm of the reconstruction loss at the first latent input, with the slot's adapter on."""
    segments, ttt = sequence.segments, sequence.ttt
    with engine._bind([sequence], [True]):
        state = SequenceState.empty(engine.model, 1, engine.device)
        question = torch.arange(len(segments.prompt_ids))[None] >= segments.question_start  # hidden from the pass
        hidden = extend(engine.model, state, input_ids=torch.tensor([segments.prompt_ids]), question=question)[:, -1]
        first = engine.latent_map(hidden, ttt.mapping).detach().requires_grad_()
        hidden = extend(engine.model, state, inputs_embeds=first[:, None])[:, -1]
        latent_rollout(engine.model, state, hidden, [ttt.latent_steps - 1], engine.latent_map, [ttt])
        engine._reconstruction([sequence], state).sum().backward()
    engine.bank.zero_grad()
    return float(first.grad.norm())


def test_reconstruction_cannot_copy_the_question(smol_engine):
    """With the question hidden from the reconstruction pass, the latent thought must carry it, and the
    gradient at the first latent step stays substantial. Let the pass see the question and the adapter learns
    to copy it within two steps: the loss collapses and almost no gradient reaches the latent chain."""
    engine = smol_engine
    ttt = TTTParams(latent_steps=8, steps=2, follow_up="bridge")
    masked = engine.chat.segments(GOLD, ttt.reconstruction_instruction, ttt.follow_up, latent=True)
    assert masked.question_start < len(masked.prompt_ids)
    unmasked = dataclasses.replace(masked, question_start=len(masked.prompt_ids))  # nothing hidden
    measured = {}
    for name, segments in (("masked", masked), ("unmasked", unmasked)):
        slot = engine.bank.acquire()
        try:
            engine.bank.reset(slot, ttt.rank, ttt.targets, torch.Generator().manual_seed(0))
            trained = train_alone(engine, segments, ttt, slot)
            measured[name] = (trained.trace.steps[-1]["loss"], _first_latent_gradient(engine, trained))
        finally:
            engine.bank.release(slot)
    (masked_loss, masked_grad), (copy_loss, copy_grad) = measured["masked"], measured["unmasked"]
    assert copy_loss < 0.1 * masked_loss, measured
    assert masked_grad > 1e-3, measured
    assert copy_grad < 0.1 * masked_grad, measured
