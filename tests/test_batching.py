"""The batched engine gives every request what it gets alone: training losses, gradient norms and answers, with
requests of mixed lengths and parameters joining and leaving a running batch; one request's cancellation or
failure does not disturb the others."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from relat_core import Engine, Request, SamplingParams, TTTParams
from relat_core.engine import AgentDone, Failed, Finished, TextDelta, TrainStep
from relat_core.loading import weights_digest

from .conftest import build_tiny

RED = [{"role": "user", "content": "Which planet is known as the red planet?"}]
PETRA = [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "In which country would you find the ancient city of Petra, carved into "
                                     "rose-coloured rock?"}]
METAL = [{"role": "user", "content": "Name a metal."}]

MIXED = {
    "short-relat": Request(RED, TTTParams(latent_steps=2, steps=3, lr=1e-2, rank=8),
                           SamplingParams(max_tokens=7, seed=1)),
    "long-relat-adapter-on": Request(
        PETRA, TTTParams(latent_steps=5, steps=2, lr=5e-2, rank=4, targets=("q_proj", "v_proj", "up_proj"),
                         mapping="realign", adapter_during_answer=True), SamplingParams(max_tokens=9, seed=2)),
    "relat-sampled": Request(METAL, TTTParams(latent_steps=3, steps=4, lr=2e-2, rank=16, residual_alpha=0.3,
                                              weight_decay=0.1, follow_up="bridge", adapter_during_answer=True),
                             SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=3)),
    "direct": Request(PETRA, TTTParams(method="direct"), SamplingParams(max_tokens=5)),
    "latent": Request(METAL, TTTParams(method="latent", latent_steps=6), SamplingParams(max_tokens=6, seed=4)),
}


@dataclass
class Outcome:
    steps: list[TrainStep] = field(default_factory=list)
    agents: list[AgentDone] = field(default_factory=list)
    text: str = ""
    finished: Finished | None = None
    failed: Failed | None = None


def drive(engine: Engine, requests: dict[str, Request], joining: dict[int, dict[str, Request]] | None = None,
          aborting: dict[int, list[str]] | None = None, finished: list[str] | None = None) -> dict[str, Outcome]:
    """Step the engine until it is empty; `joining`/`aborting` add or abort requests before the given step;
    `finished` gets the ids in the order they finish."""
    joining, aborting = joining or {}, aborting or {}
    outcomes = {request_id: Outcome() for request_id in requests}
    for request_id, request in requests.items():
        engine.add_request(request_id, request)
    step = 0
    while engine.has_unfinished_requests or any(k >= step for k in joining):
        for request_id, request in joining.get(step, {}).items():
            outcomes[request_id] = Outcome()
            engine.add_request(request_id, request)
        for request_id in aborting.get(step, []):
            engine.abort_request(request_id)
        for request_id, event in engine.step():
            outcome = outcomes[request_id]
            if isinstance(event, TrainStep):
                outcome.steps.append(event)
            elif isinstance(event, AgentDone):
                outcome.agents.append(event)
            elif isinstance(event, TextDelta):
                outcome.text += event.text
            elif isinstance(event, Finished):
                outcome.finished = event
                if finished is not None:
                    finished.append(request_id)
            else:
                outcome.failed = event
        step += 1
    return outcomes


def assert_as_alone(engine: Engine, request: Request, outcome: Outcome) -> None:
    alone = engine.run(request)
    assert outcome.finished is not None and outcome.failed is None
    got = outcome.finished.result
    assert [s.loss for s in outcome.steps] == pytest.approx([s["loss"] for s in alone.trace.steps], rel=1e-4, abs=1e-5)
    assert [s.grad_norm for s in outcome.steps] == pytest.approx([s["grad_norm"] for s in alone.trace.steps],
                                                                 rel=1e-4, abs=1e-5)
    assert got.token_ids == alone.token_ids
    assert got.text == outcome.text == alone.text
    assert got.finish_reason == alone.finish_reason
    if alone.trace.recon_loss_after is not None:
        assert got.trace.recon_loss_after == pytest.approx(alone.trace.recon_loss_after, rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    # One token per step (decode_share 0), so that the tests can join and abort requests at chosen points.
    return Engine(build_tiny(request.param, tokenizer), max_rank=16, num_slots=4, decode_share=0.0)


def test_a_mixed_batch_equals_each_request_alone(engine):
    """Mixed prompt lengths, latent lengths, step counts, learning rates, ranks, targets, methods, answer lengths,
    adapters on and off while answering, greedy and sampled: each request gets exactly its answer alone."""
    before = weights_digest(engine.model)
    outcomes = drive(engine, MIXED)
    for request_id, request in MIXED.items():
        assert_as_alone(engine, request, outcomes[request_id])
    assert sorted(engine.bank.free) == [0, 1, 2, 3]
    assert weights_digest(engine.model) == before


def test_requests_join_a_running_batch_while_others_train_and_decode(engine):
    first = {"short-relat": MIXED["short-relat"], "direct": MIXED["direct"]}
    later = {2: {"latent": MIXED["latent"], "relat-sampled": MIXED["relat-sampled"]},
             6: {"long-relat-adapter-on": MIXED["long-relat-adapter-on"]}}
    outcomes = drive(engine, first, joining=later)
    for request_id, request in MIXED.items():
        assert_as_alone(engine, request, outcomes[request_id])


def test_an_aborted_request_leaves_and_the_others_are_undisturbed(engine):
    """One request is aborted while training, another while decoding: their slots free at once, and the rest
    answer as they would alone."""
    outcomes = drive(engine, MIXED, aborting={1: ["relat-sampled"], 4: ["direct"]})
    assert outcomes["relat-sampled"].finished is None and len(outcomes["relat-sampled"].steps) == 1
    assert outcomes["direct"].finished is None and outcomes["direct"].text
    for request_id in ("short-relat", "long-relat-adapter-on", "latent"):
        assert_as_alone(engine, MIXED[request_id], outcomes[request_id])
    assert sorted(engine.bank.free) == [0, 1, 2, 3]


def test_a_request_that_fails_fails_alone(engine, monkeypatch):
    """A failure in one request's own work (its sampling) or in a batched phase it is part of (here its
    training forward) ends that request with Failed; the batch is re-run without it and the others are
    unchanged."""
    import relat_core.engine.answering as engine_module

    real_sample, real_think = engine_module.sample, engine.trainer._think

    def failing_sample(logits, params, generator):
        if params.seed == 3:
            raise RuntimeError("sampling broke")
        return real_sample(logits, params, generator)

    def failing_think(rows, *contrast):
        if any(row.request_id == "long-relat-adapter-on" and row.phase == "train" for row in rows):
            raise RuntimeError("training broke")
        return real_think(rows, *contrast)

    monkeypatch.setattr(engine_module, "sample", failing_sample)
    monkeypatch.setattr(engine.trainer, "_think", failing_think)
    outcomes = drive(engine, MIXED)
    monkeypatch.undo()
    assert "sampling broke" in str(outcomes["relat-sampled"].failed.error)
    assert "training broke" in str(outcomes["long-relat-adapter-on"].failed.error)
    for request_id in ("short-relat", "direct", "latent"):
        assert_as_alone(engine, MIXED[request_id], outcomes[request_id])
    assert sorted(engine.bank.free) == [0, 1, 2, 3] and not engine.has_unfinished_requests


def test_a_row_that_stops_early_leaves_training(engine):
    stopping = Request(RED, MIXED["short-relat"].ttt.replace(steps=5, stop_loss=1e6), SamplingParams(max_tokens=3))
    outcomes = drive(engine, {"stopping": stopping, "other": MIXED["relat-sampled"]})
    assert outcomes["stopping"].finished.result.trace.stopped_early
    assert len(outcomes["stopping"].steps) == 1 and outcomes["stopping"].steps[0].grad_norm is None
    assert_as_alone(engine, MIXED["relat-sampled"], outcomes["other"])


def test_engine_refuses_what_it_cannot_hold(engine):
    engine.add_request("a", MIXED["short-relat"])
    try:
        with pytest.raises(ValueError):
            engine.add_request("a", MIXED["direct"])
    finally:
        engine.abort_request("a")
    assert sorted(engine.bank.free) == [0, 1, 2, 3]


def test_answers_are_not_held_to_one_token_per_training_step(tokenizer):
    """While one request trains (slowly: long latent thoughts), another answers many tokens per training step."""
    engine = Engine(build_tiny("qwen3", tokenizer), max_rank=16, num_slots=1)
    engine.add_request("trainer", Request(RED, TTTParams(latent_steps=64, steps=50), SamplingParams(max_tokens=1)))
    engine.add_request("answer", Request(METAL, TTTParams(method="direct"),
                                         SamplingParams(max_tokens=20, ignore_eos=True)))
    training_steps = 0
    while "answer" in engine._sequences:
        training_steps += sum(isinstance(event, TrainStep) for _, event in engine.step())
    assert training_steps <= 3, "one token per training step would take 20"
    engine.abort_request("trainer")


def test_the_decoding_batch_answers_as_plain_greedy_decoding_does(engine):
    """An independent reference for the decoding batch (its joins, padding, masks and in-place cache growth): greedy
    decoding by a full forward pass over the whole sequence for every token, with no cache and no mask of ours.
    One request joins while the others decode."""
    import torch

    questions = {"short": METAL, "long": PETRA, "late": RED}
    sampling = SamplingParams(max_tokens=70, ignore_eos=True)  # past the cache's first growth (64 spare positions)
    direct = TTTParams(method="direct")
    outcomes = drive(engine, {name: Request(questions[name], direct, sampling) for name in ("short", "long")},
                     joining={5: {"late": Request(RED, direct, sampling)}})
    for name, messages in questions.items():
        sequence = engine.chat.segments(messages, direct.reconstruction_instruction, direct.follow_up,
                                        latent=False).prompt_ids
        reference = []
        with torch.no_grad():
            for _ in range(70):
                reference.append(int(engine.model(torch.tensor([sequence + reference])).logits[0, -1].argmax()))
        assert outcomes[name].finished.result.token_ids == reference, name
