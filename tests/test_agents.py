"""Multi-agent collaboration (relat_core/agents.py): LatentMAS's shared working memory against an independent
reference, TextMAS's contexts, relat's gradients through every agent, batching, cancellation and the prompts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from relat_core import AgentPrompts, Engine, Request, SamplingParams, TTTParams
from relat_core.agents import TEAMS, labelled, resolve_answer_format
from relat_core.engine import AgentDone, Finished, TextDelta
from relat_core.loading import weights_digest
from relat_core.params import InvalidParameter

from .conftest import build_tiny
from .test_batching import assert_as_alone, drive

QUESTION = "Which planet is known as the red planet?"
RED = [{"role": "user", "content": QUESTION}]
METAL = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a metal."}]


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    return Engine(build_tiny(request.param, tokenizer), max_rank=16, num_slots=4, decode_share=0.0)


def agent_prompt(engine: Engine, role_name: str, team: str, answer_format: str = "text") -> list[int]:
    """An agent's prompt built from the chat template directly (not through the engine's builder)."""
    role = next(role for role in TEAMS[team] if role.name == role_name)
    turn = engine.agent_prompts.turn(role, QUESTION, "", answer_format)
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": turn}], tokenize=False,
                                                add_generation_prompt=True)
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_latent_agents_share_one_cache_equal_to_one_forward(engine):
    """LatentMAS: the engine's answer equals a reference that carries a plain transformers cache through the
    agents (prompt, then latent steps, per agent; the judger's prompt; greedy decoding); and that carried cache
    gives what one forward over the whole concatenated sequence gives."""
    ttt = TTTParams(method="latent", agents="sequential", latent_steps=3, mapping="realign")
    result = engine.run(Request(RED, ttt, SamplingParams(max_tokens=6, ignore_eos=True)))

    model, embed = engine.model, engine.model.get_input_embeddings()
    cache, inputs = DynamicCache(config=model.config), []
    with torch.no_grad():
        def forward(**kwargs) -> torch.Tensor:
            return model.model(past_key_values=cache, use_cache=True, **kwargs).last_hidden_state[:, -1]

        for role in TEAMS["sequential"][:-1]:
            ids = torch.tensor([agent_prompt(engine, role.name, "sequential")])
            inputs.append(embed(ids))
            hidden = forward(input_ids=ids)
            for _ in range(3):
                latent = engine.latent_map(hidden, "realign")[:, None]
                inputs.append(latent)
                hidden = forward(inputs_embeds=latent)
        judger = torch.tensor([agent_prompt(engine, "judger", "sequential")])
        inputs.append(embed(judger))
        hidden = forward(input_ids=judger)
        whole = model.model(inputs_embeds=torch.cat(inputs, dim=1)).last_hidden_state[:, -1]
        torch.testing.assert_close(hidden, whole, rtol=1e-4, atol=1e-5)
        tokens = []
        for _ in range(6):
            token = int(model.lm_head(hidden).argmax(-1))
            tokens.append(token)
            hidden = forward(input_ids=torch.tensor([[token]]))
    assert result.token_ids == tokens
    turns = result.trace.agent_turns
    assert [(t["role"], t["kind"], t["latent_positions"]) for t in turns] == [
        ("planner", "latent", 3), ("critic", "latent", 3), ("refiner", "latent", 3), ("judger", "answer", 0)]
    assert result.usage.prompt_tokens == sum(t["prompt_tokens"] for t in turns)
    assert result.usage.completion_tokens == len(tokens)


def test_text_agents_read_the_earlier_agents_text(engine, monkeypatch):
    """TextMAS: each agent's prompt holds every earlier agent's labelled text (sequential); the hierarchical
    domain agents work alone and only the summariser reads them. Usage counts every generated token."""
    prompts: list[str] = []
    real_prefill = engine.thinker._prefill

    def recording_prefill(token_lists, *args, **kwargs):
        prompts.extend(engine.tokenizer.decode(ids) for ids in token_lists)
        return real_prefill(token_lists, *args, **kwargs)

    monkeypatch.setattr(engine.thinker, "_prefill", recording_prefill)
    for team in ("sequential", "hierarchical"):
        prompts.clear()
        ttt = TTTParams(method="direct", agents=team, agent_max_tokens=5)
        events = list(engine.generate(Request(RED, ttt, SamplingParams(max_tokens=4, seed=0, temperature=1.0))))
        result = events[-1].result
        turns = result.trace.agent_turns
        assert [t["kind"] for t in turns] == ["text", "text", "text", "answer"]
        assert [e.turn for e in events if isinstance(e, AgentDone)] == turns[:3]
        assert len(prompts) == 4
        texts = [labelled(role, turn["text"]) for role, turn in zip(TEAMS[team], turns[:3], strict=False)]
        for index, prompt in enumerate(prompts):
            for earlier in range(index):
                reads = team == "sequential" or index == 3
                assert (texts[earlier] in prompt) == reads, (team, index, earlier)
        assert result.usage.completion_tokens == sum(t["completion_tokens"] for t in turns)
        assert all(0 < t["completion_tokens"] <= 5 for t in turns[:3])


def test_relat_over_agents_gets_gradients_at_every_agents_latent_positions(engine):
    """The reconstruction rebuilds the question from the whole working memory, with every agent's copy of the
    question hidden: the loss reaches every latent input of every agent."""
    ttt = TTTParams(method="relat", agents="sequential", latent_steps=2, steps=1)
    engine.add_request("grad", Request(RED, ttt, SamplingParams(max_tokens=2)))
    row = engine._sequences["grad"]
    latent_inputs: list[torch.Tensor] = []

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1 and hidden.requires_grad:  # a latent step (prompts are longer)
            hidden.retain_grad()
            latent_inputs.append(hidden)

    handle = engine.model.model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with engine._bind([row], [True]):
            state, _ = engine.trainer._think([row])
            assert int(state.question.sum()) > 0
            engine._reconstruction([row], state).sum().backward()
    finally:
        handle.remove()
        engine.bank.zero_grad()
        engine.abort_request("grad")
    assert len(latent_inputs) == 3 * 2  # three agents before the judger, two latent steps each
    assert all(float(h.grad.norm()) > 0 for h in latent_inputs)


MIXED = {
    "single-relat": Request(RED, TTTParams(latent_steps=2, steps=2, lr=1e-2), SamplingParams(max_tokens=6, seed=1)),
    "relat-sequential": Request(METAL, TTTParams(agents="sequential", latent_steps=2, steps=2, lr=2e-2,
                                                 answer_context="thought", contrastive_eta=0.5),
                                SamplingParams(max_tokens=5, seed=2)),
    "latent-hierarchical": Request(RED, TTTParams(method="latent", agents="hierarchical", latent_steps=3,
                                                  guidance=1.5), SamplingParams(max_tokens=7, seed=3)),
    "textmas": Request(METAL, TTTParams(method="direct", agents="sequential", agent_max_tokens=4),
                       SamplingParams(max_tokens=5, temperature=0.8, seed=4)),
    "direct": Request(RED, TTTParams(method="direct"), SamplingParams(max_tokens=5)),
}


def test_mixed_single_and_multi_agent_batch_equals_each_alone(engine):
    """Single and multi-agent requests of every method (with contrast and guidance), joining at different
    steps: each gets exactly its answer alone, and single-agent requests finish without waiting for the agents."""
    before = weights_digest(engine.model)
    first = {name: MIXED[name] for name in ("relat-sequential", "textmas")}
    later = {2: {name: MIXED[name] for name in ("single-relat", "latent-hierarchical", "direct")}}
    order: list[str] = []
    outcomes = drive(engine, first, joining=later, finished=order)
    for name, request in MIXED.items():
        assert_as_alone(engine, request, outcomes[name])
        alone = engine.run(request).trace.agent_turns
        got = outcomes[name].finished.result.trace.agent_turns
        assert [(t["role"], t.get("text")) for t in got] == [(t["role"], t.get("text")) for t in alone]
    assert order.index("direct") < order.index("textmas")
    assert sorted(engine.bank.free) == [0, 1, 2, 3] and weights_digest(engine.model) == before


@pytest.mark.parametrize("method", ["relat", "direct"])
def test_cancelling_mid_agent_frees_its_slot_and_rows(engine, method):
    """Aborted after its first agent (a latent turn, or a TextMAS agent's text): the request's slot, working memory
    and decoding rows go at once, and the next request runs as it would alone."""
    ttt = TTTParams(method=method, agents="sequential", latent_steps=2, steps=1, agent_max_tokens=6)
    engine.add_request("cancelled", Request(RED, ttt, SamplingParams(max_tokens=5)))
    engine.add_request("other", MIXED["direct"])
    while not any(isinstance(event, AgentDone) and request_id == "cancelled" for request_id, event in engine.step()):
        pass
    if method == "direct":  # the critic's text is being written: the request has rows in the decoding batch
        engine.step()
        assert any(row.request_id == "cancelled" for row in engine.answerer.decoding.rows)
    engine.abort_request("cancelled")
    assert "cancelled" not in engine._sequences
    assert engine.answerer.decoding is None or all(row.request_id != "cancelled"
                                                   for row in engine.answerer.decoding.rows)
    assert sorted(engine.bank.free) == [0, 1, 2, 3]
    while engine.has_unfinished_requests:
        engine.step()
    assert_as_alone(engine, MIXED["textmas"], drive(engine, {"textmas": MIXED["textmas"]})["textmas"])


def test_answer_formats():
    """The format instruction goes to the last agent (and to a single model only when asked for)."""
    assert resolve_answer_format(TTTParams(), "Which is it?\nA) one\nB) two") == "text"  # single, auto
    sequential = TTTParams(agents="sequential")
    assert resolve_answer_format(sequential, "Which is it?\nA) one\nB) two\nC) three") == "choice"
    assert resolve_answer_format(sequential, "Write a python function that adds two numbers.") == "code"
    assert resolve_answer_format(sequential, "What is 12 times 3?") == "text"
    assert resolve_answer_format(sequential.replace(answer_format="boxed"), "What is 12 times 3?") == "boxed"
    prompts = AgentPrompts()
    judger = TEAMS["sequential"][-1]
    assert prompts.turn(judger, "Q?", "", "boxed").endswith("\\boxed{}.")
    assert "\\boxed" not in prompts.turn(TEAMS["sequential"][0], "Q?")
    for field, value in (("agents", "crowd"), ("agent_max_tokens", 0), ("answer_format", "xml")):
        with pytest.raises(InvalidParameter) as error:
            TTTParams(**{field: value})
        assert error.value.param == field


def test_a_single_model_gets_an_explicit_answer_format(engine, monkeypatch):
    prompts: list[str] = []
    real_prefill = engine.thinker._prefill
    monkeypatch.setattr(engine.thinker, "_prefill", lambda ids, *rest: prompts.extend(map(engine.tokenizer.decode, ids))
                        or real_prefill(ids, *rest))
    result = engine.run(Request(RED, TTTParams(method="direct", answer_format="boxed"), SamplingParams(max_tokens=2)))
    assert result.trace.answer_format == "boxed"
    assert QUESTION + "\n" + AgentPrompts().formats["boxed"] in prompts[0]


def test_agent_prompts_file(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"roles": {"planner": "PLAN-MARKER {question}"}, "formats": {"boxed": "BOX!"}}))
    prompts = AgentPrompts.load(good)
    assert prompts.turn(TEAMS["sequential"][0], "Q?").startswith("PLAN-MARKER Q?")
    assert prompts.roles["critic"] == AgentPrompts().roles["critic"]  # the others keep their defaults
    assert prompts.formats["boxed"] == "BOX!"
    for content, message in ((json.dumps({"roles": {"planner": "no placeholder"}}), "{question}"),
                             (json.dumps({"roles": {"poet": "{question}"}}), "unknown role"),
                             (json.dumps({"formats": {"xml": "x"}}), "unknown answer format"),
                             (json.dumps({"other": {}}), "expected an object"),
                             ("{not json", "cannot read")):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            AgentPrompts.load(bad)


def test_agents_on_the_embedded_model(smol_engine):
    """The closed loop over three agents' latent memory on the real model: the reconstruction loss falls, the
    judger answers, and the base weights are untouched."""
    before = weights_digest(smol_engine.model)
    ttt = smol_engine.defaults.replace(agents="sequential", latent_steps=2, steps=2)
    events = list(smol_engine.generate(Request(RED, ttt, SamplingParams(max_tokens=12))))
    result = events[-1].result
    assert isinstance(events[-1], Finished)
    assert sum(isinstance(e, AgentDone) for e in events) == 3
    assert result.trace.recon_loss_after < result.trace.recon_loss_before
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip()
    assert weights_digest(smol_engine.model) == before
