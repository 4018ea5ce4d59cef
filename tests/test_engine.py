"""The closed loop on tiny random Qwen3/Qwen2 models: training, isolation, the guard, the three methods."""

from __future__ import annotations

import pytest
import torch

from relat_core import Engine, InvalidParameter, Request, SamplingParams, TextDelta, TrainStep, TTTParams
from relat_core.engine import Finished
from relat_core.loading import weights_digest

from .conftest import train_alone

QUESTION = [{"role": "user", "content": "Which planet is known as the red planet?"}]


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return Engine(tiny, max_rank=16, num_slots=2)


def run(engine: Engine, messages=QUESTION, **ttt) -> object:
    sampling = ttt.pop("sampling", SamplingParams(max_tokens=6))
    return engine.run(Request(messages, TTTParams(**ttt), sampling))


def test_loss_falls_over_steps(engine):
    result = run(engine, method="relat", latent_steps=4, steps=6, lr=2e-2)
    losses = [step["loss"] for step in result.trace.steps]
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    assert result.trace.recon_loss_before == losses[0]
    assert result.trace.recon_loss_after < losses[0]
    assert all(step["grad_norm"] > 0 for step in result.trace.steps)


def test_gradient_reaches_every_latent_step_and_every_adapted_layer(engine, monkeypatch):
    """Backpropagation runs through the whole rollout: every latent input gets a gradient, and one step
    moves the adapter of every targeted layer."""
    embeds: list[torch.Tensor] = []
    latent_map = engine.latent_map

    def recording_map(hidden, mapping, *soft):
        embed = latent_map(hidden, mapping, *soft)
        if embed.requires_grad:
            embed.retain_grad()
            embeds.append(embed)
        return embed

    monkeypatch.setattr(engine, "latent_map", recording_map)
    ttt = TTTParams(latent_steps=6, steps=1, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))
    slot = engine.bank.acquire()
    try:
        engine.bank.reset(slot, ttt.rank, ttt.targets, torch.Generator().manual_seed(0))
        segments = engine.chat.segments(QUESTION, ttt.reconstruction_instruction, ttt.follow_up, latent=True)
        train_alone(engine, segments, ttt, slot)
        assert len(embeds) == 6
        norms = [float(e.grad.norm()) for e in embeds]
        assert all(n > 0 for n in norms), norms
        for layer in engine.bank.layers:
            assert bool(layer.B[slot].any()) == (layer.kind in ttt.targets), layer.kind
    finally:
        engine.bank.release(slot)


def test_base_weights_unchanged_across_many_requests(engine):
    before = weights_digest(engine.model)
    for i in range(12):
        method = ("direct", "latent", "relat")[i % 3]
        run(engine, [{"role": "user", "content": f"Question number {i}?"}], method=method, latent_steps=2 + i % 3,
            steps=1 + i % 2, lr=5e-2, adapter_during_answer=bool(i % 2), sampling=SamplingParams(max_tokens=3))
    assert weights_digest(engine.model) == before
    assert sorted(engine.bank.free) == [0, 1], "every adapter slot is released"


def test_same_request_same_result_whatever_ran_before(engine):
    params = dict(method="relat", latent_steps=3, steps=3, lr=2e-2, adapter_during_answer=True)
    first = run(engine, sampling=SamplingParams(max_tokens=8, temperature=0.9, seed=11), **params)
    for i in range(3):  # other requests leave their mark on slots and optimiser state, if anything leaks
        run(engine, [{"role": "user", "content": "Something else entirely " * (i + 1)}], method="relat",
            latent_steps=5, steps=2, lr=0.1, rank=16, sampling=SamplingParams(max_tokens=4, seed=i))
    again = run(engine, sampling=SamplingParams(max_tokens=8, temperature=0.9, seed=11), **params)
    assert again.token_ids == first.token_ids
    assert [s["loss"] for s in again.trace.steps] == [s["loss"] for s in first.trace.steps]


def test_non_finite_loss_abandons_the_update(engine):
    """A NaN in the training forward abandons the update; the base model (open loop) answers, flagged."""
    lm_head = engine.model.get_output_embeddings()
    handle = lm_head.register_forward_hook(
        lambda module, args, output: output * float("nan") if torch.is_grad_enabled() else None)
    try:
        guarded = run(engine, method="relat", latent_steps=3, steps=3, adapter_during_answer=True)
    finally:
        handle.remove()
    assert guarded.trace.aborted == "non-finite reconstruction loss at step 1"
    assert not guarded.trace.adapter_during_answer
    baseline = run(engine, method="latent", latent_steps=3)
    assert guarded.token_ids == baseline.token_ids


def test_non_finite_gradient_abandons_the_update(engine):
    """Step 1 trains normally; step 2's gradient is poisoned: the update is abandoned, the base model answers."""
    latent_steps = 3
    calls_per_step = 1 + latent_steps + 1  # prefill, latent steps, reconstruction
    calls = {"n": 0}

    def poison_second_step(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == calls_per_step + 1:
                hidden.register_hook(lambda grad: grad * float("inf"))

    handle = engine.model.base_model.layers[0].register_forward_hook(poison_second_step)
    try:
        guarded = run(engine, method="relat", latent_steps=latent_steps, steps=4)
    finally:
        handle.remove()
    assert guarded.trace.aborted == "non-finite gradient at step 2"
    assert len(guarded.trace.steps) == 1
    assert run(engine, method="latent", latent_steps=latent_steps).token_ids == guarded.token_ids
    assert sorted(engine.bank.free) == [0, 1]


def test_stop_loss_ends_training_early(engine):
    result = run(engine, method="relat", latent_steps=2, steps=5, stop_loss=1e6)
    assert result.trace.stopped_early
    assert len(result.trace.steps) == 1 and result.trace.steps[0]["grad_norm"] is None
    assert result.trace.recon_loss_after == result.trace.recon_loss_before


def test_methods_report_their_work(engine):
    direct = run(engine, method="direct", latent_steps=8)
    latent = run(engine, method="latent", latent_steps=5)
    closed = run(engine, method="relat", latent_steps=5, steps=2)
    assert direct.trace.latent_steps == 0 and not direct.trace.steps and direct.trace.recon_loss_before is None
    assert latent.trace.latent_steps == 5 and not latent.trace.steps
    assert closed.trace.latent_steps == 5 and len(closed.trace.steps) == 2
    for result in (direct, latent, closed):
        assert result.finish_reason in ("stop", "length")
        assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens == len(result.token_ids)
        assert {"train_s", "think_s", "decode_s", "total_s"} <= set(result.trace.timings)


def test_stream_yields_steps_then_text_then_result(engine):
    events = list(engine.generate(Request(QUESTION, TTTParams(latent_steps=2, steps=3),
                                          SamplingParams(max_tokens=5))))
    kinds = [type(e).__name__ for e in events]
    assert kinds[:3] == ["TrainStep"] * 3 and kinds[-1] == "Finished"
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == events[-1].result.text
    assert [e.step for e in events if isinstance(e, TrainStep)] == [1, 2, 3]


def test_closing_the_stream_mid_training_releases_the_slot(engine):
    stream = engine.generate(Request(QUESTION, TTTParams(latent_steps=2, steps=10), SamplingParams(max_tokens=5)))
    assert isinstance(next(stream), TrainStep)
    assert len(engine.bank.free) == 1
    stream.close()
    assert sorted(engine.bank.free) == [0, 1]


def test_sampling_is_seeded_and_max_tokens_bounds_length(engine):
    hot = SamplingParams(max_tokens=6, temperature=1.5, seed=3)
    one, two = run(engine, method="direct", sampling=hot), run(engine, method="direct", sampling=hot)
    other = run(engine, method="direct", sampling=SamplingParams(max_tokens=6, temperature=1.5, seed=4))
    assert one.token_ids == two.token_ids
    assert other.token_ids != one.token_ids  # random tiny model, 49k tokens: a collision would be astonishing
    capped = run(engine, method="direct", sampling=SamplingParams(max_tokens=2, temperature=1.5, seed=3))
    assert capped.token_ids == one.token_ids[:2] and capped.finish_reason == "length"
    top1 = run(engine, method="direct", sampling=SamplingParams(max_tokens=6, temperature=1.0, top_k=1, seed=9))
    assert top1.token_ids == run(engine, method="direct").token_ids


def test_stop_string_ends_generation(engine):
    reference = run(engine, method="direct", sampling=SamplingParams(max_tokens=8))
    stop = reference.text[len(reference.text) // 2:][:2]
    if not stop.strip():
        pytest.skip("the random model's text has no usable stop string here")
    cut = run(engine, method="direct", sampling=SamplingParams(max_tokens=8, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == reference.text[:reference.text.find(stop)]


@pytest.mark.parametrize("changes, param", [
    (dict(steps=-1), "steps"), (dict(rank=0), "rank"), (dict(method="chain-of-thought"), "method"),
    (dict(lr=0.0), "lr"), (dict(latent_steps=-2), "latent_steps"), (dict(targets=("lm_head",)), "targets"),
    (dict(targets=()), "targets"), (dict(mapping="pca"), "mapping"), (dict(stop_loss=-1.0), "stop_loss"),
    (dict(method="relat", latent_steps=0), "latent_steps"), (dict(steps=True), "steps"),
    (dict(targets=None), "targets"), (dict(reconstruction_instruction=None), "reconstruction_instruction"),
    (dict(soft_temperature=0.0), "soft_temperature"), (dict(soft_top_k=-1), "soft_top_k"),
    (dict(answer_context="answer"), "answer_context"), (dict(guidance=-0.5), "guidance"),
    (dict(guidance=11.0), "guidance"), (dict(guidance=float("nan")), "guidance"),
    (dict(contrastive_eta=-1.0), "contrastive_eta"), (dict(contrastive_eta=True), "contrastive_eta"),
])
def test_bad_parameters_are_refused_by_name(changes, param):
    with pytest.raises(InvalidParameter) as error:
        TTTParams(**changes)
    assert error.value.param == param


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": "   "}], "messages"),
    ([], "messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "messages"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
])
def test_bad_messages_are_refused_by_name(engine, messages, param):
    with pytest.raises(InvalidParameter) as error:
        run(engine, messages)
    assert error.value.param == param


def test_rank_above_the_engine_maximum_is_refused(engine):
    with pytest.raises(InvalidParameter) as error:
        run(engine, rank=32)
    assert error.value.param == "rank"
    assert sorted(engine.bank.free) == [0, 1]


def test_text_content_parts_and_system_messages(engine):
    parts = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Which planet is known "},
                                          {"type": "text", "text": "as the red planet?"}]}]
    flat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Which planet is known as the red planet?"}]
    assert run(engine, parts, method="latent").token_ids == run(engine, flat, method="latent").token_ids


def test_events_are_well_formed(engine):
    *_, last = engine.generate(Request(QUESTION, TTTParams(method="direct"), SamplingParams(max_tokens=2)))
    assert isinstance(last, Finished)


def test_default_parameters_depend_on_model_size(engine):
    from relat_core import default_ttt_params

    small = TTTParams(answer_context="question", gate="fidelity")  # tiny: the default measured on the small model
    assert engine.defaults == default_ttt_params(engine.num_parameters) == small
    large = default_ttt_params(8_000_000_000)
    assert (large.latent_steps, large.steps, large.rank) == (16, 5, 8)  # the paper's L, N and r
    assert not large.adapter_during_answer and large.follow_up == "bridge" and large.answer_context == "thought"
    assert large.gate == "none"  # l0's threshold was measured on a small model only


def test_the_adapter_is_on_while_answering_only_when_asked(engine, monkeypatch):
    """Same training, adapter on or off while answering: the answers differ, and only through the decoding
    passes (the latent thought uses the adapted weights either way)."""
    params = dict(method="relat", latent_steps=3, steps=3, lr=0.3, sampling=SamplingParams(max_tokens=12))
    on = run(engine, adapter_during_answer=True, **params)
    off = run(engine, adapter_during_answer=False, **params)
    assert [s["loss"] for s in on.trace.steps] == [s["loss"] for s in off.trace.steps]
    assert on.trace.adapter_during_answer and not off.trace.adapter_during_answer
    assert on.token_ids != off.token_ids


def test_ignore_eos_decodes_to_the_length_limit(engine, monkeypatch):
    first = run(engine, method="direct", sampling=SamplingParams(max_tokens=1)).token_ids[0]
    monkeypatch.setattr(engine, "stop_ids", {first})  # the model's first token is now an end-of-sequence token
    stopped = run(engine, method="direct", sampling=SamplingParams(max_tokens=5))
    assert stopped.finish_reason == "stop" and stopped.token_ids == []
    ignored = run(engine, method="direct", sampling=SamplingParams(max_tokens=5, ignore_eos=True))
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 5 and ignored.token_ids[0] == first
