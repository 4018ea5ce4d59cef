"""relat.logprob_shift (issue 27, part 1) on tiny random Qwen3 and Qwen2 models: each answer token's base logprob
equals a log-softmax over a plain transformers forward of the plain prompt and the answer's tokens (no thought, no
adapter), whatever the request decoded with (training, a thought, guidance, n > 1, sampling); training shifts
them; direct and a request the gate keeps have shift 0; one plain row per answer, none where the answer is the
base model's already; a request without it decodes as alone beside one with it; the stream carries it; both
endpoints serialise it as relat_base_logprob; without logprobs it is a 400 naming it."""

from __future__ import annotations

import json

import pytest
import torch

from relat_core import Engine, InvalidParameter, Request, SamplingParams, TextDelta, TTTParams
from relat_core.chat import normalise_messages
from relat_core.engine import _Plain

from .conftest import build_tiny
from .server_support import QUESTION, assert_error, chat, one_torch_thread, ready_server, sse_lines
from .test_batching import assert_as_alone, drive

TRAIN = TTTParams(method="relat", steps=2, latent_steps=2, lr=5e-2, rank=4, gate="none", answer_format="text",
                  logprob_shift=True)
DIRECT = TTTParams(method="direct", answer_format="text", logprob_shift=True)
GREEDY = SamplingParams(max_tokens=6, logprobs=True)
VARIANTS = {
    "relat-question": TRAIN.replace(answer_context="question"),
    "relat-thought-adapter": TRAIN.replace(answer_context="thought", adapter_during_answer=True),
    "relat-guided": TRAIN.replace(answer_context="question", guidance=2.0),  # the guidance's plain row, reused
    "latent-thought": TTTParams(method="latent", latent_steps=3, answer_format="text", logprob_shift=True),
}


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    with one_torch_thread():
        yield Engine(build_tiny(request.param, tokenizer, pack_weights=False), max_rank=8, num_slots=3,
                     decode_share=0.0)


@torch.no_grad()
def base_reference(engine: Engine, answer: list[int], messages=QUESTION) -> torch.Tensor:
    """log-softmax of a plain forward of the base model over the plain prompt (the question in the chat template)
    and the answer: row t is the base distribution of answer token t."""
    prompt = engine.chat.segments(normalise_messages(messages), TRAIN.reconstruction_instruction, "restate",
                                  latent=False).prompt_ids
    logits = engine.model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(answer)], dim=-1)


def assert_base_logprobs(engine: Engine, token_ids: list[int], entries, messages=QUESTION) -> None:
    expected = base_reference(engine, token_ids, messages)
    assert [entry.token_id for entry in entries] == token_ids
    for position, entry in enumerate(entries):
        assert entry.base_logprob == pytest.approx(float(expected[position, entry.token_id]), abs=1e-4)


def largest_shift(entries) -> float:
    return max(abs(entry.logprob - entry.base_logprob) for entry in entries)


@pytest.mark.parametrize("ttt", VARIANTS.values(), ids=VARIANTS.keys())
def test_base_logprobs_equal_a_plain_forward_of_the_plain_prompt(engine, ttt):
    events = list(engine.generate(Request(QUESTION, ttt, GREEDY)))
    result = events[-1].result
    entries = result.choices[0].logprobs
    assert result.token_ids and all(entry.base_logprob is not None for entry in entries)
    assert_base_logprobs(engine, result.token_ids, entries)
    assert largest_shift(entries) > 1e-3  # what the thought, adapter or guidance changed
    streamed = [entry for event in events if isinstance(event, TextDelta) for entry in event.logprobs]
    assert streamed == entries  # base logprobs and all, each token's once, in order
    # The plain row only reads: the answer and its logprobs are the ones the request gets without the shift.
    unshifted = engine.run(Request(QUESTION, ttt.replace(logprob_shift=False), GREEDY))
    assert unshifted.token_ids == result.token_ids
    assert [entry.logprob for entry in unshifted.choices[0].logprobs] == [entry.logprob for entry in entries]


def test_sampled_with_a_penalty_and_n_answers_each_answer_gets_its_own(engine):
    sampling = SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=3, frequency_penalty=1.0, logprobs=True)
    result = engine.run(Request(QUESTION, VARIANTS["relat-question"], sampling))
    assert len({tuple(choice.token_ids) for choice in result.choices}) > 1
    for choice in result.choices:
        assert_base_logprobs(engine, choice.token_ids, choice.logprobs)


def test_direct_and_a_kept_request_have_shift_zero(engine):
    direct = engine.run(Request(QUESTION, DIRECT, GREEDY))
    assert all(entry.base_logprob == entry.logprob for entry in direct.choices[0].logprobs)
    assert_base_logprobs(engine, direct.token_ids, direct.choices[0].logprobs)
    kept = engine.run(Request(QUESTION, TRAIN.replace(gate="confidence", gate_threshold=0.0), GREEDY))
    assert kept.trace.gated is True and kept.token_ids == direct.token_ids
    assert all(entry.base_logprob == entry.logprob for entry in kept.choices[0].logprobs)  # served, and 0
    assert [entry.logprob for entry in kept.choices[0].logprobs] == \
        pytest.approx([entry.logprob for entry in direct.choices[0].logprobs], abs=1e-5)
    trained = engine.run(Request(QUESTION, TRAIN.replace(gate="confidence", gate_threshold=1.5), GREEDY))
    assert trained.trace.gated is False
    assert_base_logprobs(engine, trained.token_ids, trained.choices[0].logprobs)
    ungated = engine.run(Request(QUESTION, TRAIN, GREEDY))
    assert trained.token_ids == ungated.token_ids
    for entry, expected in zip(trained.choices[0].logprobs, ungated.choices[0].logprobs, strict=True):
        assert (entry.logprob, entry.base_logprob) == pytest.approx((expected.logprob, expected.base_logprob), abs=1e-5)


def test_a_structured_answers_base_logprobs_are_masked_by_its_grammar(engine):
    """The base distribution under the same grammar as the answer's (a fresh matcher walked along the answer, over
    a plain forward's logits): the shift is what the request changed within the grammar, not the grammar's."""
    from relat_core.params import StructuredOutput

    output = StructuredOutput(json_object=True)
    result = engine.run(Request(QUESTION, VARIANTS["relat-question"],
                                SamplingParams(max_tokens=6, logprobs=True, structured_output=output)))
    entries = result.choices[0].logprobs
    prompt = engine.chat.segments(normalise_messages(QUESTION), TRAIN.reconstruction_instruction, "restate",
                                  latent=False).prompt_ids
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompt + result.token_ids])).logits[0].float()
    grammar = engine.grammars.matcher(output)
    assert result.token_ids and [entry.token_id for entry in entries] == result.token_ids
    for position, entry in enumerate(entries):
        row = logits[len(prompt) - 1 + position].clone()[None]
        engine.grammars.mask(row, {0: grammar})
        expected = torch.log_softmax(row[0], dim=-1).clamp(min=-9999.0)[entry.token_id]
        assert entry.base_logprob == pytest.approx(float(expected), abs=1e-4) and entry.base_logprob > -9999
        grammar.accept(entry.token_id)


def decoding_rows(engine: Engine, request: Request) -> tuple[int, int]:
    """(answer rows, plain rows) of the decoding batch once the request decodes alone."""
    engine.add_request("rows", request)
    try:
        while engine.answerer.decoding is None:
            engine.step()
        rows = engine.answerer.decoding.rows
        return sum(not isinstance(row, _Plain) for row in rows), sum(isinstance(row, _Plain) for row in rows)
    finally:
        engine.abort_request("rows")


@pytest.mark.parametrize("ttt, sampling, rows", [
    (VARIANTS["relat-question"], GREEDY, (1, 1)),
    (VARIANTS["relat-question"], SamplingParams(max_tokens=4, n=2, temperature=1.0, logprobs=True), (2, 2)),
    (VARIANTS["relat-guided"], GREEDY, (1, 1)),  # guidance's plain row serves the shift too
    (VARIANTS["relat-question"].replace(logprob_shift=False), GREEDY, (1, 0)),
    (DIRECT, GREEDY, (1, 0)),  # the answer is the base model's on the plain prompt: its own logits
], ids=["relat", "relat-n2", "guided", "no-shift", "direct"])
def test_one_plain_row_per_answer_where_one_is_needed(engine, ttt, sampling, rows):
    assert decoding_rows(engine, Request(QUESTION, ttt, sampling)) == rows
    assert engine.answerer.decoding is None and sorted(engine.bank.free) == [0, 1, 2]


def test_batched_beside_requests_without_it_nothing_of_theirs_changes(engine):
    other = [{"role": "user", "content": "Name a metal."}]
    requests = {
        "shift": Request(QUESTION, VARIANTS["relat-thought-adapter"], GREEDY),
        "relat": Request(other, VARIANTS["relat-question"].replace(logprob_shift=False),
                         SamplingParams(max_tokens=7, logprobs=True, top_logprobs=2)),
        "direct": Request(other, DIRECT.replace(logprob_shift=False), SamplingParams(max_tokens=5, logprobs=True)),
    }
    outcomes = drive(engine, requests)
    for request_id, request in requests.items():
        assert_as_alone(engine, request, outcomes[request_id])
        alone = engine.run(request).choices[0].logprobs
        batched = outcomes[request_id].finished.result.choices[0].logprobs
        assert [entry.logprob for entry in batched] == pytest.approx([entry.logprob for entry in alone], abs=1e-5)
        assert [[text for text, _ in entry.top] for entry in batched] == \
            [[text for text, _ in entry.top] for entry in alone]
        if request_id == "shift":
            assert_base_logprobs(engine, outcomes[request_id].finished.result.token_ids, batched)
        else:
            assert all(entry.base_logprob is None for entry in batched)


def test_logprob_shift_needs_logprobs(engine):
    with pytest.raises(InvalidParameter, match="logprob_shift needs logprobs") as raised:
        engine.check(Request(QUESTION, TRAIN, SamplingParams(max_tokens=4)))
    assert raised.value.param == "logprob_shift"
    with pytest.raises(InvalidParameter, match="logprob_shift must be a boolean"):
        TTTParams(logprob_shift=1)


# -- the server ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tokenizer):
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1))) as served:
        yield served


SHIFTED = {"method": "relat", "steps": 1, "latent_steps": 1, "lr": 5e-2, "gate": "none", "logprob_shift": True}


def test_chat_carries_relat_base_logprob_streamed_and_not(server):
    body = chat(server, logprobs=True, top_logprobs=1, relat=SHIFTED)
    reply = server.http.post("/v1/chat/completions", json=body).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] > 0
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs", "relat_base_logprob"}
        assert entry["relat_base_logprob"] <= 0
    assert any(abs(entry["logprob"] - entry["relat_base_logprob"]) > 1e-4 for entry in content)
    assert reply["relat"]["options"]["logprob_shift"] is True
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        chunks = [json.loads(line[6:]) for line in sse_lines(streamed)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    entries = [entry for chunk in chunks for choice in chunk["choices"] if choice.get("logprobs")
               for entry in choice["logprobs"]["content"]]
    assert entries == content  # the same training (seeded by the adapter's default seed), the same numbers


def test_native_endpoint_carries_it_streamed_and_not(server):
    body = {"question": "What is 2 + 2?", "max_tokens": 5, "temperature": 0, "logprobs": True, **SHIFTED}
    reply = server.http.post("/v1/relat", json=body).json()
    content = reply["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    assert all(isinstance(entry["relat_base_logprob"], float) for entry in content)
    with server.http.stream("POST", "/v1/relat", json={**body, "stream": True}) as streamed:
        lines = list(sse_lines(streamed))
    tokens = [json.loads(data[6:]) for event, data in zip(lines, lines[1:], strict=False) if event == "event: token"]
    assert [entry for token in tokens for entry in token["logprobs"]["content"]] == content


@pytest.mark.parametrize("endpoint, param", [("/v1/chat/completions", "relat.logprob_shift"),
                                             ("/v1/relat", "logprob_shift")])
def test_without_logprobs_it_is_a_400_naming_it(server, endpoint, param):
    if endpoint == "/v1/relat":
        body = {"question": "What is 2 + 2?", "max_tokens": 2, **SHIFTED}
    else:
        body = chat(server, relat=SHIFTED)
    assert "logprobs" in assert_error(server.http.post(endpoint, json=body), 400, param=param)["message"]
    bad = {**body, "relat": {**SHIFTED, "logprob_shift": "yes"}} if endpoint != "/v1/relat" else \
        {**body, "logprob_shift": "yes"}
    assert_error(server.http.post(endpoint, json=bad), 400, param=param)


def test_a_servers_default_shifts_the_requests_that_ask_for_logprobs(tokenizer):
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1)), logprob_shift=True) as served:
        plain = served.http.post("/v1/chat/completions", json=chat(served, relat={"method": "direct"}))
        assert plain.status_code == 200 and plain.json()["choices"][0]["logprobs"] is None
        asked = served.http.post("/v1/chat/completions", json=chat(served, logprobs=True,
                                                                   relat={"method": "direct"})).json()
        content = asked["choices"][0]["logprobs"]["content"]
        assert content and all(entry["relat_base_logprob"] == entry["logprob"] for entry in content)  # direct: 0
