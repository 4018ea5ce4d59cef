"""bf16 on CPU (issue 15, part 1): the tiny Qwen3/Qwen2 models in bfloat16 train and answer as in fp32 within
bf16's precision, a batch gives each request what it gets alone, the base weights stay as loaded, and the adapter's
master weights and AdamW state stay fp32.

Each bf16 model is the fp32 model's twin: the same weights rounded to bf16, so that what differs is the dtype alone.
The tolerances below were measured (the figures are beside each one) and set with headroom for other CPUs, whose
bf16 kernels may sum in another order.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from relat_core import Engine, LoadedModel, Request, SamplingParams, TTTParams, prepare
from relat_core.engine import Result, _Sequence
from relat_core.loading import weights_digest

from .conftest import build_tiny, train_alone
from .test_batching import MIXED, Outcome, drive
from .test_latent_options import OPTIONS

RED = [{"role": "user", "content": "Which planet is known as the red planet?"}]
PETRA = [{"role": "system", "content": "Answer in one word."},
         {"role": "user", "content": "In which country would you find the ancient city of Petra, carved into "
                                     "rose-coloured rock?"}]
METAL = [{"role": "user", "content": "Name a metal."}]

# Tolerances. bf16 keeps 8 significant bits: each rounding is off by up to 2^-8 ~ 4e-3 relative, and a latent
# thought feeds each step's output back as the next input, so errors compound over L steps and both layers. Measured
# on seed 0 of Qwen3 (seed 1's first request, and Qwen2 in these tests, within them) on a 2-core AMD EPYC without
# bf16 instructions, and set with headroom for CPUs whose kernels sum in another order:
#
# A reconstruction loss is fp32 cross-entropy over ~10 question tokens of logits computed in bf16: near-uniform
# logits (a random model, loss ~ ln 49152 = 10.8) whose errors mostly cancel in the log-sum-exp and average over the
# tokens. Measured: relative gap <= 1.1e-4 per step at lr 5e-3 (L = 4, 8 and 16), 3.6e-4 at lr 2e-2. 2e-3 is 5x
# the worst, and still 0.02 absolute, a tenth of the smallest drop the training makes (0.2), so it resolves it.
LOSS_RTOL = 2e-3
# The training's effect, loss before minus loss after: errors of <= 2.4e-3 absolute on drops of 0.2-0.5, 1.2%
# at most; 10% would still catch an update that bf16 lost.
DROP_RTOL = 0.1
# Logits of the base model (direct, latent): measured <= 3.5e-3 max over the vocabulary, about 2 ulp of the largest
# logits (0.25-0.5, where bf16's spacing is 2^-9 ~ 2e-3): 1e-2 is 5 ulp there, a tenth of the logits' std (0.11).
BASE_LOGIT_ATOL = 1e-2
# Logits after training (relat, lr 5e-3): the adapter itself differs a little (AdamW's first step is lr * sign(g),
# and a gradient entry near 0 can change sign under bf16), measured <= 1.6e-2 (4.5e-2 at lr 2e-2: it grows with
# lr). 5e-2 is 3x the worst, under half the logits' std; an unrelated model's logits differ by ~0.7 at most.
TRAINED_LOGIT_ATOL = 5e-2
# Batched against alone, both bf16 (tests/test_batching.py uses rel 1e-4 in fp32): a batch's other shapes change
# the order in which kernels sum, which in bf16 moves an output by one ulp (2^-8 to 2^-7 of it) here and there.
# Step 1 (the same weights): the loss equal, the grad norm within 1.2e-4; over later steps the updates carry the
# difference: losses <= 2e-4, grad norms <= 7.5e-2 (a 2-step option request's step 2 at lr 2e-2: 1.958 batched, 2.105
# alone; 1.6e-2 for the others). 5x and ~3x headroom. Answers: token for
# token, except that a greedy answer may part at a near tie (at lr 2e-2 the question-context request's answer
# parted from its answer alone at token 3 on Qwen3, where the two choices' logits were 1.7e-2 apart at most).
BATCH_LOSS_RTOL = 1e-3
BATCH_FIRST_GRAD_RTOL = 1e-3
BATCH_GRAD_RTOL = 0.2
# The loss after training follows the last update, which carries the last step's gradient difference with no later
# step to compare: measured 3.1e-3 (10.480 batched, 10.512 alone, relat-sampled: 4 steps at lr 2e-2). 1e-2 is 3x
# that, 0.1 absolute, under a third of that request's drop.
BATCH_AFTER_RTOL = 1e-2
# AdamW master weights: the share of A's entries (rows within the rank) that a step at lr 1e-5 must move. In fp32
# every entry with a gradient moves (1e-5 is ~1000 fp32 ulp at 0.1); half is a floor that still shows the update
# reached the slot.
MIN_MOVED = 0.5


def as_bf16(loaded: LoadedModel) -> LoadedModel:
    """The model's bf16 twin, built as `load_model(dtype="bfloat16")` builds one: from the config in bf16, then the
    fp32 weights copied in (rounded to bf16). Not `model.to(torch.bfloat16)`: that would also round RoPE's inverse
    frequencies, which transformers computes and keeps in fp32 whatever the dtype, and the twin would then differ
    from a loaded bf16 model by more than the dtype of its weights."""
    model = AutoModelForCausalLM.from_config(copy.deepcopy(loaded.model.config), dtype=torch.bfloat16,
                                             attn_implementation="sdpa")
    model.load_state_dict(loaded.model.state_dict())
    return prepare(model, loaded.tokenizer, f"{loaded.name}-bf16", "cpu")


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def twins(request, tokenizer) -> tuple[Engine, Engine]:
    """(fp32 engine, bf16 engine) on the same weights; one token per engine step, as in tests/test_batching.py, and
    a slot for each of the mixed batch's seven relat requests."""
    fp32 = build_tiny(request.param, tokenizer)
    return (Engine(fp32, max_rank=16, num_slots=8, decode_share=0.0),
            Engine(as_bf16(fp32), max_rank=16, num_slots=8, decode_share=0.0))


@pytest.fixture(scope="module")
def bf16(twins) -> Engine:
    return twins[1]


def test_the_twin_differs_in_dtype_alone(twins):
    fp32, bf16 = twins
    assert bf16.model.dtype == torch.bfloat16 and fp32.model.dtype == torch.float32
    ours, theirs = bf16.model.state_dict(), fp32.model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name].to(tensor.dtype)), name
    # As in a model loaded in bf16, RoPE's frequencies stay fp32 (rounded to bf16, in a 128-wide head, the angle at
    # position 1000 would be off by up to 2 radians).
    assert bf16.model.model.rotary_emb.inv_freq.dtype == torch.float32


# -- losses and answers against fp32 -----------------------------------------------------------------------------

@contextmanager
def logits_by_request(engine: Engine) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within: the logits each request's (first) answer's tokens were chosen from, by request id (fp32, (V,) each;
    engine.run's id is "generate")."""
    recorded: dict[str, list[torch.Tensor]] = {}
    chosen_from = engine.answerer._guided_logits

    def recording(rows: list, logits: torch.Tensor) -> torch.Tensor:
        logits = chosen_from(rows, logits)
        for index, row in enumerate(rows):
            if isinstance(row, _Sequence) and row.choice == 0 and not row.writes_agent_text:
                recorded.setdefault(row.request_id, []).append(logits[index].clone())
        return logits

    engine.answerer._guided_logits = recording  # an instance attribute over the static method, removed below
    try:
        yield recorded
    finally:
        del engine.answerer._guided_logits


def answer_with_logits(engine: Engine, request: Request) -> tuple[Result, list[torch.Tensor]]:
    """A request run alone, with the logits each of its answer's tokens was chosen from."""
    with logits_by_request(engine) as recorded:
        result = engine.run(request)
    return result, recorded.get("generate", [])


def assert_parting_only_at_near_ties(want: list[int], want_logits: list[torch.Tensor], got: list[int],
                                     got_logits: list[torch.Tensor], atol: float) -> int:
    """While two answers' contexts agree, the logits each token is chosen from agree within `atol`; returns how many
    tokens agree."""
    same = 0
    while same < min(len(want), len(got)) and want[same] == got[same]:
        same += 1
    for position in range(min(same + 1, len(want_logits), len(got_logits))):  # same + 1: the parting token's
        gap = float((want_logits[position] - got_logits[position]).abs().max())
        assert gap <= atol, (position, gap)
    return same


def assert_answers_agree_up_to_near_ties(request: Request, twins: tuple[Engine, Engine], atol: float
                                         ) -> tuple[Result, Result]:
    """Greedy answers in fp32 and bf16: while their contexts agree, the logits each token is chosen from agree
    within `atol`. Where the answers part, fp32's choice i then led bf16's choice j by at most 2 atol
    (l32[i] - l32[j] <= (l16[i] + atol) - (l16[j] - atol) <= 2 atol, as l16[j] >= l16[i]): a near tie that bf16's
    rounding may break either way; past it the contexts differ and nothing is compared. Token agreement itself is
    not required: the tiny random models' top two logits are often closer than bf16 can tell (measured gaps down
    to 3e-6), so on seed 0 of Qwen3 one answer in fifteen parts at its first token and a third part before 12."""
    (want, want_logits), (got, got_logits) = (answer_with_logits(engine, request) for engine in twins)
    # The bound means something only well inside the logits' spread (their std is 0.11 on these models).
    assert atol <= 0.5 * float(want_logits[0].std())
    assert_parting_only_at_near_ties(want.token_ids, want_logits, got.token_ids, got_logits, atol)
    return want, got


@pytest.mark.parametrize("method", ["direct", "latent"])
def test_base_model_answers_are_fp32s_up_to_near_ties(twins, method):
    ttt = TTTParams(method=method, latent_steps=6)
    for messages in (RED, PETRA, METAL):
        assert_answers_agree_up_to_near_ties(Request(messages, ttt, SamplingParams(max_tokens=12)), twins,
                                             BASE_LOGIT_ATOL)


TRAINING = {  # (messages, parameters): the default lr, the paper's L, the adapter off and on while answering
    "L8-N5": (PETRA, TTTParams(latent_steps=8, steps=5, lr=5e-3)),
    "L16-N5-adapter-on": (METAL, TTTParams(latent_steps=16, steps=5, lr=5e-3, adapter_during_answer=True)),
}
# Over 20 s on this 2-core CPU in bf16 (36 s measured while another job ran): run with the slow tests.
SLOW_TRAINING = {"L16-N5-adapter-on"}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW_TRAINING else case
                                  for case in TRAINING])
def test_relat_trains_and_answers_as_in_fp32(twins, case):
    messages, ttt = TRAINING[case]
    want, got = assert_answers_agree_up_to_near_ties(Request(messages, ttt, SamplingParams(max_tokens=12)), twins,
                                                     TRAINED_LOGIT_ATOL)
    want_losses = [step["loss"] for step in want.trace.steps]
    got_losses = [step["loss"] for step in got.trace.steps]
    assert got_losses == pytest.approx(want_losses, rel=LOSS_RTOL)
    assert got.trace.recon_loss_after == pytest.approx(want.trace.recon_loss_after, rel=LOSS_RTOL)
    # The level of the loss is mostly the base model's; the training's own effect is what it takes off. bf16 must
    # take off what fp32 does (an update lost to bf16 rounding would leave the level right and the drop at 0).
    want_drop = want_losses[0] - want.trace.recon_loss_after
    got_drop = got_losses[0] - got.trace.recon_loss_after
    assert want_drop > 0.1
    assert got_drop == pytest.approx(want_drop, rel=DROP_RTOL)


# -- batched equals alone ---------------------------------------------------------------------------------------

def assert_as_alone_bf16(engine: Engine, request: Request, outcome: Outcome) -> None:
    """tests/test_batching.py's check with bf16's tolerances (BATCH_*): losses and gradient norms that differ only by
    the rounding of kernels that sum in another order for another batch shape, and so an adapter that differs a
    little; the answer then parts from the one alone only at a near tie, as a bf16 answer parts from fp32's."""
    with logits_by_request(engine) as recorded:
        alone = engine.run(request)
    assert outcome.finished is not None and outcome.failed is None
    got = outcome.finished.result
    assert [s.loss for s in outcome.steps] == pytest.approx([s["loss"] for s in alone.trace.steps],
                                                            rel=BATCH_LOSS_RTOL)
    norms, alone_norms = [s.grad_norm for s in outcome.steps], [s["grad_norm"] for s in alone.trace.steps]
    assert norms[:1] == pytest.approx(alone_norms[:1], rel=BATCH_FIRST_GRAD_RTOL)
    assert norms == pytest.approx(alone_norms, rel=BATCH_GRAD_RTOL)
    assert got.text == outcome.text
    same = 0
    while same < min(len(got.token_ids), len(alone.token_ids)) and got.token_ids[same] == alone.token_ids[same]:
        same += 1
    if (same, same) != (len(got.token_ids), len(alone.token_ids)):
        # A greedy answer may part at a near tie: alone, its own choice led the batched one's by at most 2 atol.
        # (The logits themselves are not bounded: at lr 2e-2 with the adapter on while answering, the adapter's
        # difference moved relat-sampled's by up to 0.18 while its tokens stayed the same.)
        assert request.sampling.greedy and same < min(len(got.token_ids), len(alone.token_ids)), (same, got.token_ids)
        chosen_from = recorded["generate"][same]
        margin = float(chosen_from.max() - chosen_from[got.token_ids[same]])
        assert margin <= 2 * (TRAINED_LOGIT_ATOL if request.ttt.trains else BASE_LOGIT_ATOL), (same, margin)
    if alone.trace.recon_loss_after is not None:
        assert got.trace.recon_loss_after == pytest.approx(alone.trace.recon_loss_after, rel=BATCH_AFTER_RTOL)


def steady(request: Request) -> Request:
    """The request at lr 2e-2 at most. At 5e-2 the tiny models' training is unstable (fp32's own loss rises at step
    3 of the question-context request), and a one-ulp difference in a bf16 kernel's output grows into another
    adapter: measured, the grad norm of that request's step 3 is 0.69 batched and 1.04 alone, and its answer
    differs. That is the optimisation amplifying rounding, not batching (fp32 has the same at 2^-24, too small to
    grow); at 2e-2 and below the batch stays within the tolerances above."""
    return Request(request.messages, request.ttt.replace(lr=min(request.ttt.lr, 2e-2)), request.sampling)


@pytest.mark.slow  # about a minute in bf16 on this 2-core CPU (56-62 s measured while another job ran)
def test_a_mixed_batch_equals_each_request_alone(bf16):
    """tests/test_batching.py's mixed batch (prompt, thought and answer lengths, ranks, targets, mappings, greedy
    and sampled) and tests/test_latent_options.py's (soft tokens, the question as context, guidance, contrastive
    feedback), joining a running batch at different steps, in bf16; the base weights unchanged."""
    before = weights_digest(bf16.model)
    requests = {name: steady(request) for name, request in
                {**MIXED, **{f"option-{name}": request for name, request in OPTIONS.items()}}.items()}
    first = {name: requests[name] for name in ("short-relat", "direct", "latent", "option-soft-topk",
                                               "option-guided-latent")}
    later = {1: {name: requests[name] for name in ("long-relat-adapter-on", "option-question-context")},
             3: {name: requests[name] for name in ("relat-sampled", "option-guided-sampled",
                                                   "option-contrastive-guided", "option-direct")}}
    assert sorted([*first, *(name for joining in later.values() for name in joining)]) == sorted(requests)
    outcomes = drive(bf16, first, joining=later)
    for name, request in requests.items():
        assert_as_alone_bf16(bf16, request, outcomes[name])
    assert sorted(bf16.bank.free) == list(range(8)) and not bf16.has_unfinished_requests
    assert weights_digest(bf16.model) == before


# -- the base weights and the adapter's master weights --------------------------------------------------------

def test_base_weights_unchanged_by_bf16_requests(bf16):
    before = weights_digest(bf16.model)
    for ttt in (TTTParams(method="direct"), TTTParams(method="latent", latent_steps=3),
                TTTParams(latent_steps=3, steps=3, lr=5e-2, adapter_during_answer=True, targets=("q_proj", "up_proj")),
                TTTParams(latent_steps=2, steps=2, lr=5e-2, contrastive_eta=0.5, guidance=1.5, mapping="soft")):
        bf16.run(Request(RED, ttt, SamplingParams(max_tokens=3)))
    assert weights_digest(bf16.model) == before


def test_adapter_master_weights_and_adamw_state_stay_fp32(bf16):
    """The slots and AdamW's moments are fp32 in a bf16 model, and the update reaches them: two steps at lr 1e-5 (the
    first moves B off zero, the second A) move A's entries, about 0.1 where bf16's spacing is 2^-11 ~ 5e-4, by under
    1e-5 each, an update that bf16 master weights would round away."""
    bank, optimizer = bf16.bank, bf16.bank.optimizer
    assert all(t.dtype == torch.float32 for t in bank.parameters() + optimizer.exp_avg + optimizer.exp_avg_sq)
    ttt = TTTParams(latent_steps=3, steps=2, lr=1e-5, targets=("q_proj", "v_proj", "up_proj"))
    slot = bank.acquire()
    try:
        bank.reset(slot, ttt.rank, ttt.targets, torch.Generator().manual_seed(0))
        before = bank.slot_state(slot)
        segments = bf16.chat.segments(RED, ttt.reconstruction_instruction, ttt.follow_up, latent=True)
        trained = train_alone(bf16, segments, ttt, slot)
        assert all(step["grad_norm"] is not None for step in trained.trace.steps) and trained.step == 2
        after = bank.slot_state(slot)
        first = [m[slot].clone() for m in optimizer.exp_avg]
        second = [v[slot].clone() for v in optimizer.exp_avg_sq]
    finally:
        bank.release(slot)
    adapted = 0
    for i, layer in enumerate(bank.layers):
        a0, b0, a1, b1 = before[2 * i], before[2 * i + 1], after[2 * i], after[2 * i + 1]
        moments = first[2 * i:2 * i + 2] + second[2 * i:2 * i + 2]
        assert all(t.dtype == torch.float32 for t in (a1, b1, *moments))
        if layer.kind not in ttt.targets:
            assert torch.equal(a0, a1) and not b1.any() and not any(m.any() for m in moments), layer.name
            continue
        adapted += 1
        assert not b0.any() and b1.abs().max() <= 2.01 * ttt.lr, layer.name  # two steps of at most lr
        assert all(bool(m.any()) for m in moments), layer.name
        moved = (a1 != a0)[:ttt.rank]
        assert float(moved.float().mean()) > MIN_MOVED, layer.name
        assert float((a1 - a0).abs().max()) <= 1.01 * ttt.lr, layer.name
        # Rounded to bf16, nearly every moved entry is as it was: bf16 master weights would not have moved at all.
        lost = (a1.bfloat16() == a0.bfloat16())[:ttt.rank] & moved
        assert float(lost.sum()) > 0.9 * float(moved.sum()), layer.name
    assert adapted == 3 * bf16.model.config.num_hidden_layers
