"""The answer-quality options of issue 9 on tiny random models, each against an independent reference: soft latent
tokens, answering from the question alone with the adapter, guided decoding and contrastive latent feedback; and
all of them batched with other requests, each getting what it gets alone."""

from __future__ import annotations

import pytest
import torch

from relat_core import Engine, Request, SamplingParams, TTTParams
from relat_core.engine import DEFAULT_ADAPTER_SEED, _Plain
from relat_core.engine.answering import Answerer
from relat_core.latent import SequenceState, extend, latent_rollout
from relat_core.loading import weights_digest

from .conftest import build_tiny, train_alone
from .test_batching import assert_as_alone, drive

QUESTION = [{"role": "user", "content": "Which planet is known as the red planet?"}]
METAL = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a metal."}]


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    return Engine(build_tiny(request.param, tokenizer), max_rank=16, num_slots=4, decode_share=0.0)


def run(engine: Engine, messages=QUESTION, sampling: SamplingParams | None = None, **ttt):
    return engine.run(Request(messages, TTTParams(**ttt), sampling or SamplingParams(max_tokens=6)))


def greedy_by_full_forwards(engine: Engine, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Plain greedy decoding, re-running the whole sequence for every token (no cache, no batching)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(engine.model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in engine.stop_ids:
                break
            ids.append(token)
    return ids[len(prompt_ids):]


# -- soft latent tokens ---------------------------------------------------------------------------------------

def test_a_soft_token_is_the_expected_embedding(engine):
    hidden = torch.randn(engine.model.config.hidden_size)
    embeddings = engine.model.get_input_embeddings().weight.detach()
    logits = engine.lm_head(hidden).detach()
    # At top-k 1 the soft token is the embedding of the most likely token, whatever the temperature.
    assert torch.allclose(engine.latent_map(hidden, "soft", 2.0, 1), embeddings[logits.argmax()])
    # Over the whole vocabulary it is the expectation under softmax(logits / T).
    expected = torch.softmax(logits / 0.5, dim=-1) @ embeddings
    assert torch.allclose(engine.latent_map(hidden, "soft", 0.5, 0), expected, atol=1e-6)
    # It is differentiable in the hidden state, so the reconstruction gradient reaches the thought.
    probe = hidden.clone().requires_grad_()
    engine.latent_map(probe, "soft", 1.0, 20).sum().backward()
    assert probe.grad is not None and float(probe.grad.norm()) > 0


def test_soft_tokens_train_and_answer(engine):
    result = run(engine, method="relat", mapping="soft", soft_temperature=0.7, latent_steps=3, steps=6, lr=2e-2)
    losses = [step["loss"] for step in result.trace.steps]
    assert len(losses) == 6 and all(step["grad_norm"] > 0 for step in result.trace.steps)
    assert losses[-1] < losses[0]
    # The soft map changes the thought: the reconstruction loss differs from the norm map's.
    norm = run(engine, method="relat", mapping="norm", latent_steps=3, steps=6, lr=2e-2)
    assert result.trace.recon_loss_before != pytest.approx(norm.trace.recon_loss_before)


# -- what the answer sees --------------------------------------------------------------------------------------

def test_answer_context_question_is_the_adapted_model_on_the_prompt(engine):
    """The answer equals greedy decoding of the prompt alone by the adapted model, run with full forwards through
    the same trained adapter (trained again, alone, from the same seed)."""
    ttt = TTTParams(method="relat", latent_steps=3, steps=2, lr=5e-2, answer_context="question")
    result = engine.run(Request(QUESTION, ttt, SamplingParams(max_tokens=6)))
    assert result.trace.answer_context == "question" and result.trace.adapter_during_answer
    assert result.trace.recon_loss_after is not None

    segments = engine.chat.segments(QUESTION, ttt.reconstruction_instruction, ttt.follow_up, latent=True)
    slot = engine.bank.acquire()
    try:
        engine.bank.reset(slot, ttt.rank, ttt.targets, torch.Generator().manual_seed(DEFAULT_ADAPTER_SEED))
        trained = train_alone(engine, segments, ttt, slot)
        with engine._bind([trained], [True]):
            reference = greedy_by_full_forwards(engine, segments.prompt_ids, 6)
    finally:
        engine.bank.release(slot)
    assert result.token_ids == reference
    direct = greedy_by_full_forwards(engine, segments.prompt_ids, 6)
    assert reference != direct, "the adapter must change the answer, or this test proves nothing"


def test_answer_context_applies_to_relat_only(engine):
    latent = run(engine, method="latent", latent_steps=3, answer_context="question")
    assert latent.trace.answer_context == "thought"
    assert latent.token_ids == run(engine, method="latent", latent_steps=3).token_ids


# -- guided decoding -----------------------------------------------------------------------------------------

def test_guided_logits_interpolate_and_extrapolate():
    class Owner:
        def __init__(self, w):
            self.ttt = TTTParams(method="latent", guidance=w)

    first, second = Owner(0.25), Owner(3.0)
    rows = [first, _Plain(second), second, _Plain(first)]
    logits = torch.tensor([[1.0, 2.0], [0.0, 4.0], [2.0, 0.0], [5.0, 6.0]])
    guided = Answerer._guided_logits(rows, logits.clone())
    assert torch.equal(guided[0], logits[3] + 0.25 * (logits[0] - logits[3]))
    assert torch.equal(guided[2], logits[1] + 3.0 * (logits[2] - logits[1]))
    assert torch.equal(guided[[1, 3]], logits[[1, 3]])


@pytest.mark.parametrize("method", ["latent", "relat"])
def test_guidance_zero_is_direct_and_one_is_the_plain_path(engine, method):
    ttt = dict(method=method, latent_steps=4, steps=2, lr=5e-2, adapter_during_answer=True)
    direct = run(engine, method="direct", sampling=SamplingParams(max_tokens=8))
    own = run(engine, sampling=SamplingParams(max_tokens=8), **ttt)
    assert own.token_ids != direct.token_ids, "the thought must change the answer, or this test proves nothing"
    assert run(engine, sampling=SamplingParams(max_tokens=8), guidance=0.0, **ttt).token_ids == direct.token_ids
    halfway = run(engine, sampling=SamplingParams(max_tokens=8), guidance=0.5, **ttt)
    assert halfway.trace.guidance == 0.5 and own.trace.guidance == 1.0
    assert run(engine, method="direct", guidance=0.0).trace.guidance == 1.0  # direct has nothing to guide


# -- contrastive latent feedback -------------------------------------------------------------------------------

def test_contrast_against_an_identical_reference_changes_nothing(engine):
    """With no adapter bound, the reference row computes the same next latent as the row, so the feedback is zero:
    the contrasted thought equals the plain one; the reference row is fed the row's latents."""
    ttt = TTTParams(method="relat", latent_steps=4, contrastive_eta=2.0)
    prompt = torch.tensor([engine.chat.segments(QUESTION, ttt.reconstruction_instruction, ttt.follow_up,
                                                latent=True).prompt_ids])
    with torch.no_grad():
        alone = SequenceState.empty(engine.model, 1, engine.device)
        hidden = extend(engine.model, alone, input_ids=prompt)[:, -1]
        plain = latent_rollout(engine.model, alone, hidden, [4], engine.latent_map, [ttt])
        pair = SequenceState.empty(engine.model, 2, engine.device)
        hidden = extend(engine.model, pair, input_ids=prompt.repeat(2, 1))[:, -1]
        contrasted = latent_rollout(engine.model, pair, hidden, [4, 4], engine.latent_map, [ttt, ttt], [(0, 1)])
    assert torch.allclose(contrasted[0], plain[0], atol=1e-5)
    assert torch.allclose(contrasted[1], plain[0], atol=1e-5)


def test_contrastive_feedback_moves_the_final_thought(engine):
    ttt = dict(method="relat", latent_steps=4, steps=3, lr=5e-2)
    plain = run(engine, **ttt)
    moved = run(engine, contrastive_eta=1.0, **ttt)
    assert moved.trace.contrastive_eta == 1.0
    # Training is the same (the feedback acts on the final thought only); the thought after it is not.
    assert [s["loss"] for s in moved.trace.steps] == pytest.approx([s["loss"] for s in plain.trace.steps])
    assert moved.trace.recon_loss_after != pytest.approx(plain.trace.recon_loss_after, rel=1e-6, abs=1e-7)


# -- all of them in one batch ----------------------------------------------------------------------------------

OPTIONS = {
    "soft-topk": Request(QUESTION, TTTParams(latent_steps=3, steps=2, lr=2e-2, mapping="soft", soft_temperature=0.7,
                                             soft_top_k=50), SamplingParams(max_tokens=6, seed=1)),
    "question-context": Request(METAL, TTTParams(latent_steps=2, steps=3, lr=5e-2, rank=4,
                                                 answer_context="question"), SamplingParams(max_tokens=7)),
    "guided-sampled": Request(QUESTION, TTTParams(latent_steps=4, steps=2, lr=2e-2, guidance=0.6, mapping="soft"),
                              SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=5)),
    "contrastive-guided": Request(METAL, TTTParams(latent_steps=5, steps=2, lr=5e-2, contrastive_eta=0.5,
                                                   guidance=1.5, adapter_during_answer=True),
                                  SamplingParams(max_tokens=6)),
    "guided-latent": Request(METAL, TTTParams(method="latent", latent_steps=3, guidance=0.3),
                             SamplingParams(max_tokens=5)),
    "direct": Request(QUESTION, TTTParams(method="direct"), SamplingParams(max_tokens=4)),
}


def test_every_option_batched_equals_alone(engine):
    before = weights_digest(engine.model)
    first = {name: OPTIONS[name] for name in ("soft-topk", "guided-latent", "direct")}
    later = {1: {"question-context": OPTIONS["question-context"]},
             3: {"guided-sampled": OPTIONS["guided-sampled"], "contrastive-guided": OPTIONS["contrastive-guided"]}}
    outcomes = drive(engine, first, joining=later)
    for name, request in OPTIONS.items():
        assert_as_alone(engine, request, outcomes[name])
    assert sorted(engine.bank.free) == [0, 1, 2, 3] and not engine.has_unfinished_requests
    assert weights_digest(engine.model) == before


def test_an_aborted_guided_request_takes_its_plain_row_along(engine):
    outcomes = drive(engine, {"guided-latent": OPTIONS["guided-latent"], "direct": OPTIONS["direct"]},
                     aborting={2: ["guided-latent"]})
    assert outcomes["guided-latent"].finished is None
    assert_as_alone(engine, OPTIONS["direct"], outcomes["direct"])
    assert engine.answerer.decoding is None
