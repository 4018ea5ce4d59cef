"""Structured outputs in the engine (issue 27, part 2), on tiny random Qwen3 and Qwen2 models: an answer constrained
to a JSON schema parses and validates, at temperature 0 and sampled, for direct and relat; each constrained token is
the argmax of an independent reference (a plain transformers forward, masked to what a JSON schema allows there);
a constrained row batched beside a free one changes nothing of the free one; a schema the backend cannot compile
is refused before the request queues."""

from __future__ import annotations

import json

import pytest
import torch

from relat_core import Engine, InvalidParameter, Request, SamplingParams, TTTParams
from relat_core.chat import normalise_messages
from relat_core.params import StructuredOutput

from .conftest import build_tiny
from .server_support import QUESTION
from .test_batching import assert_as_alone, drive

DIRECT = TTTParams(method="direct", answer_format="text")
RELAT = TTTParams(method="relat", latent_steps=2, steps=1, answer_format="text", gate="none")
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "kind": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    return Engine(build_tiny(request.param, tokenizer, pack_weights=False), max_rank=8, num_slots=2,
                  decode_share=0.0)


def valid_person(text: str) -> bool:
    """An independent check of the schema (no JSON-schema library is needed for this one)."""
    value = json.loads(text)
    return (set(value) == {"name", "age", "kind"} and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["age"], int) and 0 <= value["age"] <= 150 and value["kind"] in ("cat", "dog"))


@pytest.mark.parametrize("ttt", [DIRECT, RELAT], ids=["direct", "relat"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_schema_answer_parses_and_validates(engine, ttt, temperature):
    sampling = SamplingParams(max_tokens=120, temperature=temperature, seed=3,
                              structured_output=StructuredOutput.from_schema(PERSON))
    result = engine.run(Request(QUESTION, ttt, sampling))
    assert result.finish_reason == "stop", result.text  # the grammar ended it, not the length
    assert valid_person(result.text), result.text


def test_json_object_is_any_object(engine):
    sampling = SamplingParams(max_tokens=200, structured_output=StructuredOutput(json_object=True))
    result = engine.run(Request(QUESTION, DIRECT, sampling))
    if result.finish_reason == "stop":  # a random model may write a long object; unfinished, it is cut
        assert isinstance(json.loads(result.text), dict)
    else:
        assert result.text.startswith("{")


@torch.no_grad()
def test_each_constrained_token_is_the_references_masked_argmax(engine):
    """The reference masks a plain forward's logits to the tokens whose text keeps the answer a prefix of the one
    schema-valid form it can take: an enum of two words in a fixed wrapper."""
    schema = {"enum": ["alpha", "omega"]}
    sampling = SamplingParams(max_tokens=10, structured_output=StructuredOutput.from_schema(schema))
    result = engine.run(Request(QUESTION, DIRECT, sampling))
    assert result.text in ('"alpha"', '"omega"')
    prompt = engine.chat.segments(normalise_messages(QUESTION), DIRECT.reconstruction_instruction, "restate",
                                  latent=False).prompt_ids
    tokenizer = engine.tokenizer
    words = ['"alpha"', '"omega"']
    tokens: list[int] = []
    for _ in range(len(result.token_ids)):
        logits = engine.model(torch.tensor([prompt + tokens])).logits[0, -1]
        so_far = tokenizer.decode(tokens)
        allowed = [t for t in range(len(tokenizer))
                   if any(w.startswith(so_far + tokenizer.decode([t])) and tokenizer.decode([t]) for w in words)]
        mask = torch.full_like(logits, float("-inf"))
        mask[allowed] = 0
        tokens.append(int((logits + mask).argmax()))
    assert result.token_ids == tokens


def test_a_constrained_row_leaves_a_free_row_unchanged(engine):
    """A free request batched beside constrained ones (greedy and sampled) gets exactly its answer alone, and
    each constrained one its own answer alone."""
    structured = StructuredOutput.from_schema(PERSON)
    requests = {
        "free": Request(QUESTION, DIRECT, SamplingParams(max_tokens=12)),
        "json": Request(QUESTION, DIRECT, SamplingParams(max_tokens=60, structured_output=structured)),
        "json-sampled": Request(QUESTION, RELAT, SamplingParams(max_tokens=60, temperature=1.0, seed=5,
                                                                structured_output=structured)),
        "free-relat": Request(QUESTION, RELAT, SamplingParams(max_tokens=12, temperature=0.7, seed=9)),
    }
    outcomes = drive(engine, requests)
    for request_id, request in requests.items():
        assert_as_alone(engine, request, outcomes[request_id])
    assert valid_person(outcomes["json"].finished.result.text)


def test_n_answers_each_follow_the_schema(engine):
    sampling = SamplingParams(max_tokens=60, temperature=1.0, seed=1, n=3,
                              structured_output=StructuredOutput.from_schema(PERSON))
    result = engine.run(Request(QUESTION, RELAT, sampling))
    assert len(result.choices) == 3
    for choice in result.choices:
        assert valid_person(choice.text), choice.text


def test_logprobs_of_a_constrained_answer_are_finite(engine):
    sampling = SamplingParams(max_tokens=30, logprobs=True, top_logprobs=5,
                              structured_output=StructuredOutput.from_schema({"enum": ["alpha", "omega"]}))
    result = engine.run(Request(QUESTION, DIRECT, sampling))
    entries = result.choices[0].logprobs
    assert entries and all(-9999.0 <= entry.logprob <= 0 for entry in entries)
    # Past the two allowed words, every top token is one the grammar refuses: reported as -9999, as vLLM does.
    assert any(value == -9999.0 for entry in entries for _, value in entry.top)


@pytest.mark.parametrize("schema", ['{"type": "nonsense"}', '{"properties": {"a": {"$ref": "#/defs/missing"}}}',
                                    "{not json"])
def test_a_schema_the_backend_cannot_compile_is_refused_before_it_queues(engine, schema):
    request = Request(QUESTION, DIRECT, SamplingParams(structured_output=StructuredOutput(json_schema=schema)))
    with pytest.raises(InvalidParameter) as raised:
        engine.check(request)
    assert raised.value.param == "response_format"
    assert "cannot be compiled" in str(raised.value) and ".cc:" not in str(raised.value)
    assert not engine.has_unfinished_requests


@pytest.mark.parametrize("gate, threshold", [("fidelity", 0.0), ("confidence", 1.0)])
def test_a_gated_request_restarts_its_grammar_when_it_trains(engine, gate, threshold):
    """The confidence gate drafts direct's answer (constrained too) before it decides; a request that then trains
    answers afresh, from the grammar's start: its answer is valid JSON, not a draft's continuation."""
    ttt = TTTParams(method="relat", latent_steps=2, steps=1, answer_format="text", gate=gate, gate_threshold=threshold,
                    answer_context="question")
    sampling = SamplingParams(max_tokens=80, structured_output=StructuredOutput.from_schema(PERSON))
    result = engine.run(Request(QUESTION, ttt, sampling))
    assert result.trace.gated is not None and result.trace.steps  # it trained
    assert valid_person(result.text), result.text
