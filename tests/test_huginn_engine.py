"""The engine serving a Huginn (recurrent-depth) checkpoint: direct, latent and relat with per-request depth,
adaptive exit and truncated backpropagation through the recurrence.

The checkpoint is tiny and random, written by the tests in huginn-0125's layout (tests/huginn_support.py) with the
embedded model's tokenizer beside it, and loaded through `load_model` as `relat serve --model DIR` loads it.
"""

from __future__ import annotations

import pytest
import torch

from relat_core import Engine, InvalidParameter, Request, SamplingParams, load_model
from relat_core.engine import Finished, TrainStep
from relat_core.loading import weights_digest
from relat_core.models.huginn import HuginnForCausalLM, Recurrence, RowRecurrence
from relat_core.params import HUGINN_TARGETS

from .huginn_support import published_tensors, write_checkpoint
from .server_support import one_torch_thread

QUESTION = [{"role": "user", "content": "Name a primary colour."}]
QUICK = dict(latent_steps=2, steps=2, cache=False)
ANSWER = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():  # the tiny models are faster on one thread, and the machine is shared
        yield


@pytest.fixture(scope="module")
def huginn_folder(tmp_path_factory, tokenizer):
    folder = write_checkpoint(tmp_path_factory.mktemp("raven"), published_tensors(len(tokenizer)), len(tokenizer))
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(huginn_folder) -> Engine:
    return Engine(load_model(str(huginn_folder), device="cpu"), num_slots=4, max_rank=8)


def ask(engine: Engine, sampling: SamplingParams = ANSWER, **options):
    return engine.run(Request(QUESTION, engine.defaults.replace(**options), sampling))


def test_the_engine_takes_the_models_depth_and_attention_targets_as_defaults(engine):
    assert isinstance(engine.model, HuginnForCausalLM)
    defaults = engine.defaults
    assert (defaults.num_steps, defaults.backprop_depth, defaults.init_scale) == (4, 2, 1.0)  # the tiny config's
    assert defaults.targets == ("Wqkv", "attn.proj") and engine.bank.kinds == set(HUGINN_TARGETS)
    # Every projection of every block (2 prelude, 4 core, 2 coda) and the recurrence's input adapter has a slot.
    assert len(engine.bank.layers) == 8 * 4 + 1


@pytest.mark.parametrize("method", ["direct", "latent", "relat"])
def test_every_method_answers_and_the_trace_reports_the_depth(engine, method):
    result = ask(engine, method=method, num_steps=3, **QUICK)
    assert len(result.token_ids) == 4 and result.finish_reason == "length"
    options = result.trace.options
    assert (options["num_steps"], options["exit_criterion"], options["backprop_depth"]) == (3, "none", 2)
    # A fixed depth: every answer position read back ran exactly num_steps recurrences.
    assert result.trace.recurrences == {"mean": 3.0, "min": 3, "max": 3, "positions": 3}
    if method == "relat":
        assert len(result.trace.steps) == 2 and result.trace.recon_loss_after is not None


def test_adaptive_exit_is_capped_and_reported(engine):
    never = ask(engine, method="latent", num_steps=5, exit_criterion="latent-diff", exit_threshold=1e-12, **QUICK)
    assert never.trace.recurrences["max"] == 5 and never.trace.recurrences["min"] == 5  # cannot fire: the cap
    at_once = ask(engine, method="latent", num_steps=5, exit_criterion="kl", exit_threshold=1e9, **QUICK)
    assert at_once.trace.recurrences == {"mean": 1.0, "min": 1, "max": 1, "positions": 3}
    assert ask(engine, method="latent", num_steps=5, exit_criterion="kl", **QUICK).trace.options[
        "exit_threshold"] == pytest.approx(1e-3)  # the criterion's default, named in the trace


def test_init_scale_zero_ignores_the_seed_and_the_seed_fixes_a_random_state(engine):
    def answer(seed: int, **options):
        return ask(engine, SamplingParams(max_tokens=6, ignore_eos=True, seed=seed), method="latent", **options,
                   **QUICK).token_ids

    assert answer(1, init_scale=0.0) == answer(2, init_scale=0.0)
    assert answer(1) == answer(1)  # a random initial state, drawn from the seed: the same request, the same answer
    logits = []
    for seed in (1, 2):  # and another seed draws another state
        with torch.no_grad(), engine.model.recurring(Recurrence([RowRecurrence(3, noise_seed=seed)])):
            logits.append(engine.model(torch.tensor([[5, 6, 7]])).logits)
    assert not torch.allclose(*logits)


def test_relat_trains_the_adapter_through_the_recurrence_and_leaves_the_base_alone(engine):
    before = weights_digest(engine.model)
    trained = {}
    for depth in (1, 4):
        request = Request(QUESTION, engine.defaults.replace(method="relat", num_steps=4, backprop_depth=depth,
                                                            targets=HUGINN_TARGETS, **QUICK), ANSWER)
        engine.add_request("r", request)
        while engine.num_unfinished_requests:
            for _, event in engine.step():
                if isinstance(event, TrainStep) and event.step == 1:  # the slot after its first AdamW step
                    slot = engine._sequences["r"].slot
                    trained[depth] = {layer.name: layer.B[slot].detach().abs().sum().item()
                                      for layer in engine.bank.layers}
                assert not isinstance(event, Finished) or event.result.trace.aborted is None
    # The gradient reached every kind of layer, the recurrence's adapter and the core blocks among them: with B = 0
    # at first, a nonzero B after one step is a nonzero gradient.
    for depth, norms in trained.items():
        assert all(value > 0 for value in norms.values()), (depth, [n for n, v in norms.items() if v == 0])
    # Truncation changes the gradient the core receives (one recurrence against all four).
    core = [name for name in trained[1] if ".core_block." in name]
    assert any(abs(trained[1][name] - trained[4][name]) > 1e-6 * trained[4][name] for name in core)
    assert weights_digest(engine.model) == before
    assert not any(parameter.requires_grad for parameter in engine.model.parameters())


def test_truncated_backpropagation_is_the_last_recurrences_alone(engine):
    """Through the last k of n recurrences: the gradient of a forward at depth n truncated to k equals that of a
    depth-k forward started from the state after n - k recurrences (computed without a graph)."""
    model = engine.model
    embeds = model.get_input_embeddings().weight[torch.tensor([[3, 4, 5, 6]])].detach()
    target = torch.randn(1, 4, model.config.n_embd, generator=torch.Generator().manual_seed(0))

    def gradient(**options) -> torch.Tensor:
        leaf = embeds.clone().requires_grad_(True)
        (model(inputs_embeds=leaf, init_scale=0.0, return_logits=False, **options).last_hidden_state * target).sum() \
            .backward()
        return leaf.grad

    with torch.no_grad():
        warm = model(inputs_embeds=embeds, num_steps=3, init_scale=0.0, return_logits=False).latent_states
    truncated = gradient(num_steps=5, backprop_depth=2)
    torch.testing.assert_close(truncated, gradient(num_steps=2, initial_state=warm), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(truncated, gradient(num_steps=5), rtol=1e-3, atol=1e-6)  # it truncates something


def test_batched_equals_alone_for_rows_of_different_depths(engine):
    requests = {
        "shallow": engine.defaults.replace(method="relat", num_steps=2, **QUICK),
        "deep": engine.defaults.replace(method="relat", num_steps=5, backprop_depth=3, **QUICK),
        "exit": engine.defaults.replace(method="latent", num_steps=6, exit_criterion="argmax-stability",
                                        exit_threshold=2, **QUICK),
        # Its first latent step trains without a graph alone, and with the others' here: at full depth either way.
        "truncated-exit": engine.defaults.replace(method="relat", num_steps=4, exit_criterion="kl",
                                                  exit_threshold=1e9, backprop_latent_steps=1, **QUICK),
        "direct": engine.defaults.replace(method="direct", num_steps=3),
    }
    sampling = SamplingParams(max_tokens=5, ignore_eos=True, seed=7)
    alone = {name: engine.run(Request(QUESTION, ttt, sampling)) for name, ttt in requests.items()}
    for name, ttt in requests.items():
        engine.add_request(name, Request(QUESTION, ttt, sampling))
    batched = {}
    while engine.num_unfinished_requests:
        for name, event in engine.step():
            if isinstance(event, Finished):
                batched[name] = event.result
    for name, result in alone.items():
        assert batched[name].token_ids == result.token_ids, name
        assert batched[name].trace.recurrences == result.trace.recurrences, name
        losses = [step["loss"] for step in result.trace.steps]
        assert [step["loss"] for step in batched[name].trace.steps] == pytest.approx(losses, rel=1e-4), name


def test_options_a_model_lacks_are_refused_naming_them(engine, tiny_qwen3):
    llama_like = Engine(tiny_qwen3)
    for option, value in [("num_steps", 4), ("init_scale", 0.0), ("exit_criterion", "kl"), ("backprop_depth", 2)]:
        with pytest.raises(InvalidParameter, match=f"{option} applies to recurrent-depth models") as raised:
            llama_like.check(Request(QUESTION, llama_like.defaults.replace(**{option: value})))
        assert raised.value.param == option
    with pytest.raises(InvalidParameter, match="has no layers named q_proj") as raised:
        engine.check(Request(QUESTION, engine.defaults.replace(targets=("q_proj", "Wqkv"))))
    assert raised.value.param == "targets"
    with pytest.raises(InvalidParameter, match="has no layers named Wqkv"):
        llama_like.check(Request(QUESTION, llama_like.defaults.replace(targets=("Wqkv",))))


def test_bf16_weights_train_an_fp32_adapter_and_answer(huginn_folder):
    """The GPU's dtype, on the CPU: the weights load in bf16, the slots and AdamW state stay fp32, and relat runs."""
    loaded = load_model(str(huginn_folder), device="cpu", dtype="bfloat16")
    engine = Engine(loaded, num_slots=1, max_rank=8)
    assert engine.model.dtype == torch.bfloat16 and engine.model.transformer["wte"].weight.dtype == torch.bfloat16
    before = weights_digest(engine.model)
    result = ask(engine, method="relat", num_steps=3, **QUICK)
    assert len(result.token_ids) == 4 and all(torch.isfinite(torch.tensor(step["loss"]))
                                              for step in result.trace.steps)
    assert all(t.dtype == torch.float32 for t in engine.bank.parameters())
    assert weights_digest(engine.model) == before
