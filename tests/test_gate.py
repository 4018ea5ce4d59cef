"""The gate (relat_core/engine/gating.py) on tiny random Qwen3 and Qwen2 models: a request the gate keeps answers as
direct does, token for token (greedy and seeded sampling, its text streamed once); a request the gate trains
answers as gate "none" does; the signals are measured (l0 equals the first training step's loss) and traced; a
batch mixing gates, methods and joins gives each request what it gets alone; aborting a draft frees its slot; the
base weights never change."""

from __future__ import annotations

import math

import pytest
import torch

from relat_core import Engine, Request, SamplingParams, TTTParams
from relat_core.engine import gating
from relat_core.loading import weights_digest

from .conftest import build_tiny
from .test_batching import assert_as_alone, drive

QUESTION = [{"role": "user", "content": "Which planet is known as the red planet?"}]
OTHER = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
QUICK = dict(latent_steps=2, steps=2, lr=1e-2, rank=4, answer_format="text", answer_context="question")
GREEDY = SamplingParams(max_tokens=10)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.9, seed=11)
KEEP = {"confidence": 0.0, "fidelity": 1e9, "auto": 1e9}  # thresholds no request crosses: every one kept direct
TRAIN = {"confidence": 2.0, "fidelity": -1.0, "auto": -1e9}  # thresholds every request crosses: every one trains


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # One token per step (decode_share 0), so that requests can join a running batch at chosen points.
    engine = Engine(build_tiny(request.param, tokenizer), max_rank=8, num_slots=8, decode_share=0.0)
    yield engine
    torch.set_num_threads(threads)


def ask(messages=QUESTION, sampling=GREEDY, **ttt) -> Request:
    return Request(messages, TTTParams(**{**QUICK, **ttt}), sampling)


def stream(engine: Engine, request: Request) -> tuple[str, list, object]:
    """The request alone: its streamed text, its training steps, and its result."""
    text, steps, result = "", [], None
    for event in engine.generate(request):
        text += getattr(event, "text", "") if type(event).__name__ == "TextDelta" else ""
        if type(event).__name__ == "TrainStep":
            steps.append(event)
        if type(event).__name__ == "Finished":
            result = event.result
    return text, steps, result


@pytest.mark.parametrize("gate", ["confidence", "fidelity", "auto"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED, SamplingParams(max_tokens=3)],
                         ids=["greedy", "sampled", "short"])
def test_a_kept_request_is_direct_token_for_token(engine, gate, sampling):
    direct = engine.run(ask(sampling=sampling, method="direct"))
    text, steps, result = stream(engine, ask(sampling=sampling, gate=gate, gate_threshold=KEEP[gate]))
    assert result.token_ids == direct.token_ids
    assert text == result.text == direct.text  # the draft's held text is streamed once, in order
    assert result.finish_reason == direct.finish_reason
    assert steps == [] and result.trace.steps == []
    trace = result.trace
    assert trace.gated is True and trace.gate["gated"] is True
    assert trace.gate["kind"] == gate and trace.gate["threshold"] == KEEP[gate]
    assert trace.gate["value"] == trace.signals[gating.SIGNAL_OF[gate]]
    assert trace.adapter_during_answer is False and trace.answer_context == "question"
    if gate != "fidelity":  # the draft's confidence: a geometric mean of probabilities
        assert 0 < trace.signals["draft_confidence"] <= 1
        assert trace.signals["draft_entropy"] >= 0 and 0 <= trace.signals["draft_margin"] <= 1
    if gate != "confidence":
        assert math.isfinite(trace.signals["l0"])
    assert engine.slots_in_use == 0


@pytest.mark.parametrize("gate", ["confidence", "fidelity", "auto"])
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_trained_request_answers_as_without_a_gate(engine, gate, sampling):
    ungated = engine.run(ask(sampling=sampling, cache=False))
    text, steps, result = stream(engine, ask(sampling=sampling, gate=gate, gate_threshold=TRAIN[gate], cache=False))
    assert result.token_ids == ungated.token_ids  # the draft's sampler is put back before training
    assert text == result.text == ungated.text
    assert [s.loss for s in steps] == pytest.approx([s["loss"] for s in ungated.trace.steps], rel=1e-4)
    trace = result.trace
    assert trace.gated is False and trace.gate["gated"] is False
    assert trace.adapter_during_answer is True
    if gate != "confidence":  # l0, one graph-free forward, is the loss the first training step reports
        assert trace.signals["l0"] == pytest.approx(ungated.trace.recon_loss_before, rel=1e-4)
    else:
        assert trace.signals["l0"] == trace.recon_loss_before
    assert trace.signals["loss_drop"] == pytest.approx(trace.recon_loss_before - trace.recon_loss_after)
    if gate != "fidelity":
        assert isinstance(trace.signals["agreement"], bool)
    assert ungated.trace.gated is None and ungated.trace.gate is None and "loss_drop" in ungated.trace.signals
    assert engine.slots_in_use == 0


def test_a_mixed_batch_equals_each_request_alone(engine):
    """Kept and trained requests of every gate, gate none, direct and latent, greedy and sampled, some joining
    while others draft or train: each gets exactly what it gets alone, and the base weights never change."""
    before = weights_digest(engine.model)
    requests = {
        "keep-confidence": ask(gate="confidence", gate_threshold=KEEP["confidence"]),
        "train-confidence": ask(OTHER, SAMPLED, gate="confidence", gate_threshold=TRAIN["confidence"], cache=False),
        "keep-fidelity": ask(OTHER, gate="fidelity", gate_threshold=KEEP["fidelity"]),
        "none": ask(cache=False),
    }
    joining = {2: {"train-auto": ask(OTHER, gate="auto", gate_threshold=TRAIN["auto"], cache=False),
                   "direct": ask(method="direct")},
               5: {"keep-auto": ask(OTHER, SAMPLED, gate="auto", gate_threshold=KEEP["auto"]),
                   "train-fidelity": ask(gate="fidelity", gate_threshold=TRAIN["fidelity"], cache=False,
                                         answer_context="thought"),
                   "latent": ask(method="latent")}}
    outcomes = drive(engine, requests, joining)
    for request_id, request in {**requests, **joining[2], **joining[5]}.items():
        assert_as_alone(engine, request, outcomes[request_id])
        gated = outcomes[request_id].finished.result.trace.gated
        assert gated is (True if request_id.startswith("keep") else False if request_id.startswith("train") else None)
    assert weights_digest(engine.model) == before
    assert engine.slots_in_use == 0


def test_aborting_a_draft_frees_its_slot(engine):
    engine.add_request("drafting", ask(gate="confidence", gate_threshold=KEEP["confidence"]))
    engine.step()  # prefilled, its first draft token chosen
    assert engine.slots_in_use == 1
    engine.abort_request("drafting")
    assert engine.slots_in_use == 0 and not engine.has_unfinished_requests


def test_the_gate_applies_to_one_model_answering_once(engine):
    """n > 1, agents and guidance train as gate none does: the trace's gate is None."""
    for request in (ask(QUESTION, SamplingParams(max_tokens=3, n=2, temperature=1.0, seed=1), gate="confidence"),
                    ask(gate="confidence", guidance=0.5), ask(gate="fidelity", agents="sequential")):
        result = engine.run(request)
        assert result.trace.gate is None and result.trace.gated is None and result.trace.steps
    assert engine.run(ask(method="direct", gate="auto")).trace.gate is None


def test_gate_options_are_validated():
    with pytest.raises(ValueError, match="gate must be one of"):
        TTTParams(gate="always")
    with pytest.raises(ValueError, match="gate_threshold must be a number"):
        TTTParams(gate="fidelity", gate_threshold=float("nan"))
    with pytest.raises(ValueError, match="draft_tokens must be an integer in"):
        TTTParams(draft_tokens=0)
