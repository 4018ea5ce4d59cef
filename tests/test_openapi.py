"""The OpenAPI document is the API: it holds the classes the server validates requests with (the engine's bounds,
narrowed by the server's limits) and every status each route sends; schemathesis then drives a real server on a
tiny model from the document alone, with all of its checks, streams included."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import schemathesis
import torch
from relat_server.app import create_app, requires_key
from relat_server.errors import ErrorResponse
from relat_server.openapi import ERRORS, GENERATION_ERRORS, OPERATIONS, openapi_document
from relat_server.served_schema import TOOL_FIELDS, ServedModel, below
from relat_server.settings import LIMITS, Settings
from schemathesis.core.failures import FailureGroup

from relat_core import Engine
from relat_core.params import ALL_TARGETS, METHODS, RECURRENCE_OPTIONS, SAMPLING_BOUNDS, TTT_BOUNDS

from .conftest import build_tiny
from .server_support import AUTH, KEY, serve_in_thread, wait_for

# Small enough that every generated request takes milliseconds on the tiny model: the training, the thought, the
# agents' text and the answer (the context leaves up to 18 tokens after the shortest prompt, of 30).
LIMITED = {"max_steps": 2, "max_latent_steps": 2, "max_rank": 4, "max_agent_tokens": 4, "max_num_steps": 3,
           "max_model_len": 48}


# The tiny model the server below serves, as its document describes it: a transformer (no recurrence options)
# whose chat template (the embedded tokenizer's, 49152 tokens) has no tool support, in a context of max_model_len,
# with SERVED's TTT defaults (and the small-model default gate) and a Qwen3's layers.
TINY = ServedModel(recurrent=False, tools=False, vocabulary=49152, context_length=LIMITED["max_model_len"],
                   defaults={"method": "latent", "steps": 1, "latent_steps": 1, "gate": "fidelity"},
                   targets=("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"))


def document(served: ServedModel | None = None, **settings) -> dict:
    """The document of a server with these settings serving a model of these facts (None: before one is loaded,
    the document of every model); it needs no model."""
    app = create_app(Settings(**settings), load_engine=lambda: None)
    return openapi_document(app, app.state.service.models, partial(requires_key, app.state.service), served)


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def field(doc: dict, component: str, name: str) -> dict:
    """A property's schema, without the null that every optional field allows."""
    schema = doc["components"]["schemas"][component]["properties"][name]
    branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
    assert len(branches) == 1, schema
    return resolve(doc, branches[0])


# -- the document ------------------------------------------------------------------------------------------------

def test_request_bodies_are_the_validating_classes_with_the_engines_bounds():
    doc = document()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    native = doc["paths"]["/v1/relat"]["post"]["requestBody"]
    assert chat["required"] and resolve(doc, chat["content"]["application/json"]["schema"])["title"] == \
        "ChatCompletionRequest"
    assert resolve(doc, native["content"]["application/json"]["schema"])["title"] == "RelatRequest"
    assert field(doc, "ChatCompletionRequest", "relat")["title"] == "RelatOptions"
    # Every numeric TTT bound of relat_core.params, in the chat extension and at the native top level alike.
    for component in ("RelatOptions", "RelatRequest"):
        for name, bound in TTT_BOUNDS.items():
            # The server's max_rank and max_num_steps, below the engine's 256 and 1024.
            narrowed = {"rank": {"maximum": 16}, "num_steps": {"maximum": 64}}.get(name, {})
            assert field(doc, component, name) == bound.json_schema() | narrowed, name
        assert field(doc, component, "method")["enum"] == list(METHODS)
        assert field(doc, component, "targets") == {"type": "array", "minItems": 1,
                                                   "items": {"type": "string", "enum": list(ALL_TARGETS)}}
        assert field(doc, component, "reconstruction_instruction")["pattern"] == r"\S"
    for component, name, bound in (("ChatCompletionRequest", "max_completion_tokens", "max_tokens"),
                                   ("ChatCompletionRequest", "seed", "seed"),
                                   ("ChatCompletionRequest", "temperature", "temperature"),
                                   ("RelatRequest", "top_p", "top_p")):
        assert field(doc, component, name) == SAMPLING_BOUNDS[bound].json_schema()
    assert field(doc, "ChatCompletionRequest", "n") == {"type": "integer", "minimum": 1, "maximum": 8}  # max_n
    assert field(doc, "RelatRequest", "n") == {"type": "integer", "minimum": 1, "maximum": 8}
    assert field(doc, "RelatRequest", "question")["pattern"] == r"\S"


def test_a_servers_limits_are_its_documents_maxima():
    doc = document(**LIMITED)
    for name, setting in LIMITS.items():
        for component in ("RelatOptions", "RelatRequest"):
            schema = field(doc, component, name)
            assert schema["maximum"] == LIMITED[setting] and schema["minimum"] == TTT_BOUNDS[name].low


def test_every_route_and_every_status_it_sends_is_documented():
    doc = document(api_keys=[KEY])  # it would raise if a route and OPERATIONS differed
    assert {(method, path) for path, item in doc["paths"].items() for method in item} == set(OPERATIONS)
    for method, path in OPERATIONS:
        responses = doc["paths"][path][method]["responses"]
        for status, response in responses.items():
            assert response["headers"]["X-Request-Id"]["required"], (path, status)
            if status in map(str, ERRORS) and not OPERATIONS[method, path].probe:  # a probe's 503 is its state
                assert response["content"]["application/json"]["schema"] == \
                    {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/relat"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", *map(str, GENERATION_ERRORS)}
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert responses["200"]["content"]["text/event-stream"]["itemSchema"]["required"][-1] == "data"
        assert responses["429"]["headers"]["Retry-After"]["required"]
    assert set(doc["paths"]["/ready"]["get"]["responses"]) == {"200", "503"}
    assert set(doc["components"]["schemas"]["ErrorResponse"]["properties"]) == set(ErrorResponse.model_fields)
    assert "422" not in str(doc["paths"])  # validation errors are 400s, as vLLM and OpenAI answer


def test_security_follows_the_settings():
    assert "securitySchemes" not in document()["components"]
    assert "401" not in document()["paths"]["/v1/models"]["get"]["responses"]
    doc = document(api_keys=[KEY])
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    secured = {path for path, item in doc["paths"].items() if "security" in next(iter(item.values()))}
    # /metrics open by default, as in vLLM
    assert secured == {"/v1/chat/completions", "/v1/completions", "/v1/relat", "/v1/models",
                       "/v1/adapters/{adapter_id}", "/admin/status"}
    admin = doc["paths"]["/admin/status"]["get"]["responses"]
    assert "401" in admin and "403" not in admin  # a key is needed, and there are keys to give
    assert "403" in document()["paths"]["/admin/status"]["get"]["responses"]  # no keys: refused
    metrics = document(api_keys=[KEY], metrics_need_key=True)["paths"]["/metrics"]["get"]
    assert metrics["security"] == [{"bearer": []}] and "401" in metrics["responses"]


def test_the_document_describes_the_model_served():
    """What the model cannot take is left out; what its sizes bound is stated; the rest is every model's."""
    every, tiny = document(), document(TINY)
    huginn = document(ServedModel(recurrent=True, tools=True, vocabulary=1000, context_length=None))
    for component in ("RelatOptions", "RelatRequest", "CompletionRelatOptions"):
        for name in RECURRENCE_OPTIONS:
            assert name in every["components"]["schemas"][component]["properties"]
            assert name in huginn["components"]["schemas"][component]["properties"]
            assert name not in tiny["components"]["schemas"][component]["properties"]
    for name in TOOL_FIELDS:
        assert name in huginn["components"]["schemas"]["ChatCompletionRequest"]["properties"]
        assert name not in tiny["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "ChatTool" in huginn["components"]["schemas"] and "ChatTool" not in tiny["components"]["schemas"]
    assert field(tiny, "ChatCompletionRequest", "logit_bias")["propertyNames"] == {"pattern": below(49152)}
    assert field(every, "ChatCompletionRequest", "logit_bias")["propertyNames"] == {"pattern": "^[0-9]+$"}
    assert field(tiny, "RelatRequest", "max_tokens")["maximum"] == LIMITED["max_model_len"] - 1
    assert "maximum" not in field(huginn, "RelatRequest", "max_tokens")  # no context known


@pytest.mark.parametrize("limit", [1, 9, 10, 11, 1000, 49152])
def test_the_token_id_pattern_holds_exactly_the_ids_below_the_vocabulary(limit):
    import re

    pattern = re.compile(below(limit))
    assert [i for i in range(60000) if pattern.fullmatch(str(i))] == list(range(limit))
    assert pattern.fullmatch(f"00{limit - 1}") and not pattern.fullmatch(f"00{limit}")  # read as ints, as sent


def test_rules_across_fields_are_in_the_schema():
    """top_logprobs and logprob_shift need logprobs: the document says so, as the server refuses otherwise."""
    import jsonschema

    doc = document(TINY)

    def valid(component: str, body: dict) -> bool:
        resolver = {**doc["components"]["schemas"][component], "components": doc["components"]}
        return jsonschema.Draft202012Validator(resolver).is_valid(body)

    message = [{"role": "user", "content": "Hi"}]
    for body, expected in (({"top_logprobs": 2}, False), ({"top_logprobs": 2, "logprobs": True}, True),
                           ({"top_logprobs": 0}, True), ({"relat": {"logprob_shift": True}}, False),
                           ({"relat": {"logprob_shift": True}, "logprobs": True}, True)):
        assert valid("ChatCompletionRequest", {"messages": message, **body}) is expected, body
    assert not valid("RelatRequest", {"question": "Hi", "logprob_shift": True})
    assert valid("RelatRequest", {"question": "Hi", "logprob_shift": True, "logprobs": True})
    assert not valid("CompletionRequest", {"prompt": "Hi", "relat": {"logprob_shift": True}})
    assert valid("CompletionRequest", {"prompt": "Hi", "relat": {"logprob_shift": True}, "logprobs": 0})


def test_rules_over_the_servers_defaults_are_in_the_schema():
    """What the engine refuses given the server's defaults (TINY's: method latent, steps 1, latent_steps 1, gate
    fidelity), the served document refuses too; an option left out reads the default."""
    import jsonschema

    doc = document(TINY)

    def valid(component: str, body: dict) -> bool:
        resolver = {**doc["components"]["schemas"][component], "components": doc["components"]}
        return jsonschema.Draft202012Validator(resolver).is_valid(body)

    for options, expected in (({"method": "relat"}, True), ({"method": "relat", "latent_steps": 0}, False),
                              ({"latent_steps": 0}, True),  # latent, the default method, needs none
                              ({"return_adapter": True}, False),  # the default method does not train
                              ({"return_adapter": True, "method": "relat"}, True),
                              ({"return_adapter": True, "method": "relat", "steps": 0}, False),
                              ({"targets": ["q_proj"]}, True), ({"targets": ["Wqkv"]}, False)):
        assert valid("RelatOptions", options) is expected, options
        assert valid("RelatRequest", {"question": "Hi", **options}) is expected, options
    trains = {"method": "relat", "gate": "confidence"}
    for body, expected in (({"max_tokens": 0, "relat": trains}, False), ({"max_tokens": 1, "relat": trains}, True),
                           ({"max_tokens": 0, "relat": {**trains, "steps": 0}}, True),
                           ({"max_tokens": 0, "relat": {"method": "relat"}}, True),  # the default gate reads no draft
                           ({"relat": {**trains, "continuations": [" a"]}}, False), ({"max_tokens": 0}, True)):
        assert valid("CompletionRequest", {"prompt": "Hi", **body}) is expected, body
    assert document(ServedModel(recurrent=False, tools=False, vocabulary=10, context_length=None))[
        "components"]["schemas"]["RelatOptions"].get("allOf") is None  # no defaults given: no such rule


# -- schemathesis against a running server -----------------------------------------------------------------------

# Most generated requests leave the TTT fields and max_tokens out: the defaults keep them cheap too.
SERVED = {"api_keys": [KEY], "max_concurrency": 2, "request_timeout": 60, "batch_window": 0, "max_tokens": 4,
          "method": "latent", "steps": 1, "latent_steps": 1, **LIMITED}


@pytest.fixture(scope="module")
def server(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread, and the machine is shared
    engine = Engine(build_tiny("qwen3", tokenizer, seed=3), max_rank=4, num_slots=2)
    with serve_in_thread(Settings(**SERVED), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        yield served
    torch.set_num_threads(threads)


# What a schema-valid request may still be refused for: the rules no JSON schema can state, each in the document's
# descriptions (status, code, param). Anything else refused is a document that promises too much. (The third rule,
# the user's question last, question_last below keeps to, so that it refuses nothing.)
BEYOND_THE_SCHEMA = {
    (400, "context_length_exceeded", "max_completion_tokens"), (400, "context_length_exceeded", "max_tokens"),
    (413, "context_length_exceeded", "messages"),  # the prompt alone fills the context
    # /v1/completions: a prompt that fills the context
    (413, "context_length_exceeded", "prompt"),
    # A JSON schema the grammar backend cannot compile (response_format): the document says "an object", and which
    # objects are schemas xgrammar supports, no schema can say.
    (400, "invalid_value", "response_format"),
}


def timed_out_only_when_asked(ctx, response, case) -> bool | None:
    """not_a_server_error, narrowed: the one 5xx a request may get is the documented 504 of a deadline it set
    itself (relat.timeout, or timeout on /v1/relat), which a generated one may well make too short."""
    if response.status_code != 504:
        return None
    body = case.body if isinstance(case.body, dict) else {}
    options = body.get("relat") if isinstance(body.get("relat"), dict) else body
    assert options.get("timeout") is not None, "a request without a deadline of its own timed out"
    return True


def refused_only_beyond_the_schema(ctx, response, case) -> bool | None:
    """positive_data_acceptance, narrowed: a schema-valid request gets a 400 or 413 only for a rule in
    BEYOND_THE_SCHEMA."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code not in (400, 413):
        return None
    error = response.json()["error"]
    assert (response.status_code, error["code"], error["param"]) in BEYOND_THE_SCHEMA, \
        f"a request valid by the document was refused: {response.status_code} {error}"
    return True


# The document as the server below serves it (test_the_served_document_is_this_one); schemathesis needs it when the
# tests are collected, before any server runs.
schema = schemathesis.openapi.from_dict(document(TINY, **SERVED), config=schemathesis.Config.from_dict({
    "seed": 12,  # reproducible in CI; the examples still differ per operation
    "suppress-health-check": ["too_slow"],  # generating a chat body takes a while on a busy 2-core machine
    "headers": AUTH,
    "request-timeout": 60,
    "generation": {"max-examples": 25, "database": "none"},
    # 400, 413 and 504 only as refused_only_beyond_the_schema and timed_out_only_when_asked allow
    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "504"]},
               "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "413", "429",
                                                                  "504"]}},
}))


@schema.hook("map_case")
def question_last(context, case):
    """A schema-valid chat request ends with the user's question: the one rule of the messages that no JSON schema
    can state (it is about the last item), so that generated requests reach the engine rather than that 400."""
    messages = case.body.get("messages") if isinstance(case.body, dict) else None
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(messages, list):
        return case
    last = messages[-1] if messages else {}
    if last.get("role") != "user" or not isinstance(last.get("content"), str) or not last["content"].strip():
        case.body["messages"] = [*messages, {"role": "user", "content": "Why is the sky blue?"}]
    return case


def test_the_served_document_is_this_one(server):
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401  # the document needs a key like the API
    assert httpx.get(f"{server.url}/openapi.json", headers=AUTH).json() == document(TINY, **SERVED)


def test_options_left_out_of_the_document_are_still_refused(server):
    """Left out is not accepted: the classes still validate them and the engine answers a 400 naming each."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 1}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for body, param in (({"tools": [tool]}, "tools"), ({"relat": {"num_steps": 2}}, "relat.num_steps")):
        response = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, **body}, headers=AUTH, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    response = httpx.post(f"{server.url}/v1/relat", json={"question": "Hi", "init_scale": 1.0}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "init_scale", response.text


def test_no_document_before_the_model_is_loaded():
    """It describes the loaded model: while loading, a 503 like the API's."""
    import threading

    release = threading.Event()
    with serve_in_thread(Settings(), lambda: release.wait(30) and None) as served:
        response = httpx.get(f"{served.url}/openapi.json")
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        release.set()


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                              "stream_options": {"include_usage": True}, "relat": {"method": "relat"}}),
    ("/v1/relat", {"question": "Hi", "stream": True, "method": "relat", "agents": "sequential"}),
    ("/v1/completions", {"prompt": ["Hi", "Yo"], "stream": True, "echo": True, "logprobs": 1,
                         "stream_options": {"include_usage": True}, "relat": {"method": "relat"}})])
def test_every_event_of_a_stream_is_checked_against_the_document(server, path, body):
    """The streams' event schemas are not vacuous: the events pass, and fail once the document says otherwise."""
    case = schema[path]["POST"].Case(body=body)
    response = case.call(base_url=server.url, headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"][0].startswith("text/event-stream")
    case.validate_response(response)
    wrong = document(TINY, **SERVED)
    for name in ("ChatCompletionChunk", "TokenEvent", "TrainStepEvent", "CompletionChunk"):
        wrong["components"]["schemas"][name]["required"].append("missing")
    wrong_case = schemathesis.openapi.from_dict(wrong)[path]["POST"].Case(body=body)
    with pytest.raises(FailureGroup, match="SSE event violates schema"):
        wrong_case.validate_response(response)


@schema.parametrize()
def test_the_server_is_as_documented(case, server):
    case.call_and_validate(base_url=server.url,
                           additional_checks=[refused_only_beyond_the_schema, timed_out_only_when_asked])
