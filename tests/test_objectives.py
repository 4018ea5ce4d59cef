"""The training objectives (relat_core/engine/objectives.py) in the engine, on tiny random Qwen3 and Qwen2 models:
each first-step loss equals an independent reference computed with the base model alone (at step 0 the slot's B
is 0, so the adapted model is the base model); entropy lowers its own loss; a batch mixing objectives gives each
request what it gets alone; the base weights never change; early stops, the non-finite guard and the adapter cache
work as they do for the reconstruction; and the trace's options show adapter_during_answer as it applied."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import relat_core.engine.objectives as objectives_module
from relat_core import Engine, Request, SamplingParams, TTTParams, load_model
from relat_core.adapter_cache import AdapterCache
from relat_core.chat import normalise_messages
from relat_core.loading import weights_digest
from relat_core.params import ATTENTION_TARGETS, MLP_TARGETS

from .conftest import build_tiny
from .huginn_support import FIXED, published_tensors, write_checkpoint
from .test_batching import assert_as_alone, drive

QUESTION = [{"role": "user", "content": "Which planet is known as the red planet?"}]
PETRA = [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "In which country would you find the ancient city of Petra?"}]
METAL = [{"role": "user", "content": "Name a metal."}]
# answer_format "text": the prompt holds the question as asked, with no format instruction appended.
QUICK = dict(latent_steps=2, steps=2, lr=1e-2, rank=4, answer_format="text")
GREEDY = SamplingParams(max_tokens=4)


def peaked(architecture: str, tokenizer, seed: int = 7):
    """A tiny random model whose next-token distributions are far from uniform (its LM head scaled up): at the
    uniform distribution the entropy's gradient vanishes, and a random tiny model's logits are nearly uniform."""
    loaded = build_tiny(architecture, tokenizer, seed=seed, pack_weights=False)  # packed copies would not scale
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(40)
    return loaded


def unhook(engine: Engine) -> None:
    for layer in engine.bank.layers:  # so that another engine on the same model is the only one hooked
        layer.handle.remove()


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread, and the machine is shared
    # One token per step (decode_share 0), so that requests can join a running batch at chosen points.
    engine = Engine(peaked(request.param, tokenizer), max_rank=8, num_slots=6, decode_share=0.0)
    yield engine
    unhook(engine)
    torch.set_num_threads(threads)


def prompt(engine: Engine, messages=QUESTION):
    """The request's segments as the engine builds them (answer_format "text": no instruction appended)."""
    return engine.chat.segments(normalise_messages(messages), TTTParams().reconstruction_instruction, "restate",
                                latent=True)


@torch.no_grad()
def base_logits(engine: Engine, token_ids: list[int]) -> torch.Tensor:
    """The base model's logits over a token sequence: a plain forward of the Hugging Face model, (T, V)."""
    return engine.model(input_ids=torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def greedy_draft(engine: Engine, token_ids: list[int], k: int) -> list[int]:
    """k greedy tokens of the base model after token_ids, ending after a stop token: plain forwards, no cache."""
    draft: list[int] = []
    while len(draft) < k and not (draft and draft[-1] in engine.stop_ids):
        draft.append(int(base_logits(engine, token_ids + draft)[-1].argmax()))
    return draft


def test_prompt_lm_scores_the_questions_tokens_where_the_template_places_them(engine):
    segments = prompt(engine, PETRA)
    question = PETRA[-1]["content"]
    tokenizer = engine.tokenizer
    assert tokenizer.decode(segments.prompt_ids[segments.question_start:segments.question_end]) == question
    assert tokenizer.decode(segments.prompt_ids[segments.question_end:]).startswith("<|im_end|>")


def test_prompt_lm_first_loss_is_the_base_models_cross_entropy_on_the_question(engine):
    result = engine.run(Request(QUESTION, TTTParams(objective="prompt_lm", **QUICK), GREEDY))
    segments = prompt(engine)
    ids, start, end = segments.prompt_ids, segments.question_start, segments.question_end
    reference = F.cross_entropy(base_logits(engine, ids)[start - 1:end - 1], torch.tensor(ids[start:end]))
    trace = result.trace
    assert trace.objective == "prompt_lm" and len(trace.steps) == 2
    assert trace.steps[0]["loss"] == pytest.approx(float(reference), rel=1e-5)
    assert trace.recon_loss_before == trace.steps[0]["loss"]
    assert math.isfinite(trace.recon_loss_after) and trace.recon_loss_after != trace.recon_loss_before


def test_entropy_first_loss_is_the_mean_entropy_over_the_base_models_greedy_draft(engine):
    k = 5
    result = engine.run(Request(QUESTION, TTTParams(objective="entropy", entropy_tokens=k, **QUICK), GREEDY))
    ids = prompt(engine).prompt_ids
    draft = greedy_draft(engine, ids, k)
    # The draft is the start of direct's greedy answer.
    direct = engine.run(Request(QUESTION, TTTParams(method="direct", answer_format="text"),
                                SamplingParams(max_tokens=k)))
    assert direct.token_ids[:len(draft)] == [t for t in draft if t not in engine.stop_ids]
    log_probs = F.log_softmax(base_logits(engine, ids + draft[:-1])[-len(draft):], dim=-1)
    reference = -(log_probs.exp() * log_probs).sum(-1).mean()
    trace = result.trace
    assert trace.objective == "entropy"
    assert trace.steps[0]["loss"] == pytest.approx(float(reference), rel=1e-5)


def test_entropy_lowers_its_own_loss(engine):
    ttt = TTTParams(objective="entropy", steps=6, lr=1e-2, rank=8, targets=ATTENTION_TARGETS + MLP_TARGETS,
                    answer_format="text")
    trace = engine.run(Request(QUESTION, ttt, GREEDY)).trace
    losses = [step["loss"] for step in trace.steps]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert all(math.isfinite(step["grad_norm"]) for step in trace.steps)
    assert losses[-1] < losses[0] and trace.recon_loss_after < trace.recon_loss_before / 2


MIXED = {
    "reconstruction": Request(QUESTION, TTTParams(**QUICK), SamplingParams(max_tokens=5, seed=1)),
    "prompt-lm-question": Request(PETRA, TTTParams(objective="prompt_lm", **{**QUICK, "steps": 3},
                                                   answer_context="question"), SamplingParams(max_tokens=4)),
    "prompt-lm-thought-adapter-on": Request(
        METAL, TTTParams(objective="prompt_lm", latent_steps=3, steps=2, lr=2e-2, rank=8, adapter_during_answer=True,
                         targets=("q_proj", "v_proj", "up_proj")), SamplingParams(max_tokens=6, seed=2)),
    "entropy-sampled": Request(QUESTION, TTTParams(objective="entropy", entropy_tokens=3, **QUICK),
                               SamplingParams(max_tokens=5, temperature=0.9, top_p=0.9, seed=3)),
    "entropy-question": Request(PETRA, TTTParams(objective="entropy", steps=4, lr=5e-3, rank=2,
                                                 answer_context="question"), SamplingParams(max_tokens=3)),
    "direct": Request(METAL, TTTParams(method="direct"), SamplingParams(max_tokens=4)),
}


def test_a_batch_of_objectives_gives_each_request_what_it_gets_alone(engine):
    before = weights_digest(engine.model)
    outcomes = drive(engine, MIXED)
    for request_id, request in MIXED.items():
        assert_as_alone(engine, request, outcomes[request_id])
        objective = outcomes[request_id].finished.result.trace.objective
        assert objective == (request.ttt.objective if request.ttt.trains else None)
    assert sorted(engine.bank.free) == list(range(6))
    assert weights_digest(engine.model) == before  # the base weights: no gradient, no optimiser


@pytest.mark.parametrize("objective", ["prompt_lm", "entropy"])
def test_the_controls_answer_from_the_question_do_not_depend_on_the_thoughts_length(engine, objective):
    """Neither control runs a latent thought in training, and an answer from the question runs none after it: at
    latent_steps 1, 4 and 16 the losses and the answer are the same (bench/RESULTS.md reports them once)."""
    results = [engine.run(Request(PETRA, TTTParams(objective=objective, **{**QUICK, "latent_steps": steps},
                                                   answer_context="question", cache=False), GREEDY))
               for steps in (1, 4, 16)]
    assert all(result.token_ids == results[0].token_ids for result in results)
    assert all([s["loss"] for s in result.trace.steps] == [s["loss"] for s in results[0].trace.steps]
               for result in results)


def test_requests_of_other_objectives_join_a_running_batch(engine):
    """An entropy request drafts at its first step while others are mid-training."""
    first = {name: MIXED[name] for name in ("reconstruction", "prompt-lm-question")}
    later = {1: {"entropy-question": MIXED["entropy-question"]}, 2: {"entropy-sampled": MIXED["entropy-sampled"]}}
    outcomes = drive(engine, first, joining=later)
    for request_id in (*first, *later[1], *later[2]):
        assert_as_alone(engine, MIXED[request_id], outcomes[request_id])


def test_stop_loss_ends_training_on_the_objectives_loss(engine):
    trace = engine.run(Request(QUESTION, TTTParams(objective="prompt_lm", stop_loss=1e3, **QUICK), GREEDY)).trace
    assert trace.stopped_early and len(trace.steps) == 1 and trace.steps[0]["grad_norm"] is None
    assert trace.recon_loss_after == trace.recon_loss_before  # the weights never moved


def test_a_non_finite_objective_loss_abandons_the_update(engine, monkeypatch):
    real = objectives_module.losses

    def non_finite(*args):
        return real(*args) * float("nan")

    monkeypatch.setattr(objectives_module, "losses", non_finite)
    result = engine.run(Request(QUESTION, TTTParams(objective="entropy", answer_context="question", **QUICK),
                                GREEDY))
    assert result.trace.aborted == "non-finite entropy loss at step 1"
    assert not result.trace.adapter_during_answer and result.token_ids


@pytest.mark.parametrize("ttt, applied", [
    (TTTParams(answer_context="question", **QUICK), True),  # the question through the adapter, whatever asked
    (TTTParams(answer_context="thought", **QUICK), False),
    (TTTParams(answer_context="thought", adapter_during_answer=True, **QUICK), True),
    (TTTParams(objective="prompt_lm", answer_context="question", **QUICK), True),
    (TTTParams(answer_context="question", **{**QUICK, "steps": 0}), False),  # nothing trained: no adapter
    (TTTParams(method="direct", adapter_during_answer=True), False),
])
def test_the_traces_options_show_adapter_during_answer_as_applied(engine, ttt, applied):
    trace = engine.run(Request(QUESTION, ttt, SamplingParams(max_tokens=1))).trace
    assert trace.options["adapter_during_answer"] is applied is trace.adapter_during_answer
    assert trace.options["objective"] == ttt.objective and trace.options["targets"] == list(ttt.targets)


@pytest.fixture(scope="module")
def cached(tokenizer):
    """An engine with an adapter cache, on a model of its own."""
    engine = Engine(peaked("qwen3", tokenizer, seed=8), max_rank=8, num_slots=2,
                    adapter_cache=AdapterCache(max_entries=32, max_bytes=64 << 20))
    yield engine
    unhook(engine)


@pytest.mark.parametrize("objective", ["prompt_lm", "entropy"])
def test_a_cache_hit_answers_as_the_miss_did(cached, objective):
    request = Request(PETRA, TTTParams(objective=objective, answer_context="question", **QUICK), GREEDY)
    miss, hit = cached.run(request), cached.run(request)
    assert (miss.trace.cache, hit.trace.cache) == ("miss", "hit")
    assert hit.token_ids == miss.token_ids and hit.trace.steps == miss.trace.steps
    assert hit.trace.recon_loss_after == miss.trace.recon_loss_after and hit.trace.objective == objective


@pytest.mark.parametrize("first, second, outcome", [
    ({}, {"objective": "prompt_lm"}, "miss"),
    ({"objective": "prompt_lm"}, {"objective": "entropy"}, "miss"),
    ({"objective": "entropy"}, {"objective": "entropy", "entropy_tokens": 3}, "miss"),
    ({}, {"entropy_tokens": 3}, "hit"),  # the draft's length shapes the entropy objective's training alone
    ({"objective": "prompt_lm"}, {"objective": "prompt_lm", "entropy_tokens": 3}, "hit"),
])
def test_the_objective_is_in_the_adapter_caches_key(cached, first, second, outcome):
    base = TTTParams(**{**QUICK, "steps": 1}, cache=True)
    messages = [{"role": "user", "content": f"Which objective? {first} then {second}"}]  # a fresh key per case
    assert cached.run(Request(messages, base.replace(**first), GREEDY)).trace.cache == "miss"
    assert cached.run(Request(messages, base.replace(**second), GREEDY)).trace.cache == outcome


def test_a_recurrent_depth_model_trains_on_every_objective_batched_as_alone(tmp_path, tokenizer):
    """Huginn (relat_core/models/huginn/): each row at its request's depth, through the same phases."""
    folder = write_checkpoint(tmp_path, published_tensors(len(tokenizer)), len(tokenizer))
    tokenizer.save_pretrained(folder)
    engine = Engine(load_model(str(folder), device="cpu"), num_slots=3, max_rank=8, decode_share=0.0)
    try:
        before = weights_digest(engine.model)
        requests = {objective: Request(QUESTION, engine.defaults.replace(objective=objective, **QUICK, **FIXED),
                                       SamplingParams(max_tokens=3)) for objective in ("reconstruction", "prompt_lm",
                                                                                       "entropy")}
        outcomes = drive(engine, requests)
        for request_id, request in requests.items():
            assert_as_alone(engine, request, outcomes[request_id])
            assert math.isfinite(outcomes[request_id].finished.result.trace.recon_loss_after)
        assert weights_digest(engine.model) == before
    finally:
        unhook(engine)
