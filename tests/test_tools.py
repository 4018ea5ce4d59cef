"""Structured outputs and tools through the server (issue 27, parts 2 and 3), on a tiny random Qwen3: a
response_format answer parses and validates, streamed and not, on both endpoints; tools reach the prompt through the
chat template; a named or required tool_choice is enforced by the grammar and comes back as message.tool_calls (and
as OpenAI streams them); the Hermes calls that `auto` parses, read from text, and streamed in pieces split anywhere;
a multi-turn exchange with tool results; each bad input a 400 naming its field."""

from __future__ import annotations

import json

import pytest
from relat_server.tools import ToolStream, ToolUse, parse_reply

from relat_core import Engine

from .conftest import build_tiny
from .server_support import assert_error, chat, data_events, ready_server, sse_lines
from .tool_support import with_tool_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
DIRECT = {"method": "direct"}
RELAT = {"method": "relat", "latent_steps": 1, "steps": 1, "gate": "none"}


@pytest.fixture(scope="module")
def tool_server(tokenizer):
    engine = Engine(with_tool_template(build_tiny("qwen3", tokenizer)), max_rank=8, num_slots=2)
    with ready_server(engine) as served:
        yield served


@pytest.fixture(scope="module")
def plain_server(tokenizer):
    with ready_server(Engine(build_tiny("qwen3", tokenizer), max_rank=8, num_slots=2)) as served:
        yield served


def valid_weather(arguments: dict) -> bool:
    return (set(arguments) == {"city", "days"} and isinstance(arguments["city"], str)
            and len(arguments["city"]) <= 10 and isinstance(arguments["days"], int) and 1 <= arguments["days"] <= 7)


def valid_person(value: dict) -> bool:
    return (set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 8
            and isinstance(value["age"], int) and 0 <= value["age"] <= 99)


def stream(server, body: dict) -> list[dict]:
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return [event for event in data_events(sse_lines(response)) if event != "[DONE]"]


# -- response_format ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relat", [DIRECT, RELAT], ids=["direct", "relat"])
def test_a_json_schema_answer_validates_streamed_and_not(tool_server, relat):
    body = chat(tool_server, max_completion_tokens=80, relat=relat, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    reply = tool_server.http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert valid_person(json.loads(message["content"])), message
    streamed = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in stream(tool_server, body)
                       if chunk["choices"])
    assert streamed == message["content"]


def test_json_object_and_the_native_endpoint(tool_server):
    body = chat(tool_server, max_completion_tokens=60, relat=DIRECT, response_format={"type": "json_object"})
    content = tool_server.http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert content.startswith("{")
    native = tool_server.http.post("/v1/relat", json={
        "question": "Who?", "method": "direct", "max_tokens": 80, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    assert native.status_code == 200, native.text
    assert valid_person(json.loads(native.json()["answer"]))


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "response_format"),
    ({"type": "json_schema"}, "response_format"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name"),
])
def test_a_bad_response_format_is_a_400_naming_it(tool_server, response_format, param):
    reply = tool_server.http.post("/v1/chat/completions", json=chat(tool_server, response_format=response_format))
    assert_error(reply, 400, param=param)


# -- tools ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relat", [DIRECT, RELAT], ids=["direct", "relat"])
def test_a_named_tool_choice_is_a_valid_call(tool_server, relat):
    body = chat(tool_server, max_completion_tokens=60, relat=relat, tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    reply = tool_server.http.post("/v1/chat/completions", json=body).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and valid_weather(json.loads(call["function"]["arguments"]))
    # Streamed: the header (id, name) first, then the arguments in pieces that join to the same JSON.
    chunks = [chunk["choices"][0] for chunk in stream(tool_server, body) if chunk["choices"]]
    deltas = [c["delta"]["tool_calls"][0] for c in chunks if c["delta"].get("tool_calls")]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"].startswith("call_")
    assert all(d["index"] == 0 and "id" not in d for d in deltas[1:])
    assert "".join(d["function"].get("arguments", "") for d in deltas) == call["function"]["arguments"]
    assert chunks[-1]["finish_reason"] == "tool_calls"


def test_required_makes_one_or_more_calls_of_the_tools(tool_server):
    body = chat(tool_server, max_completion_tokens=120, relat=DIRECT, tools=[WEATHER, TIME], tool_choice="required")
    reply = tool_server.http.post("/v1/chat/completions", json=body).json()
    choice = reply["choices"][0]
    if choice["finish_reason"] == "length":  # a random model may run out of tokens mid-array: then it is text
        assert choice["message"]["content"].startswith("[")
        return
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"]
    for call in choice["message"]["tool_calls"]:
        arguments = json.loads(call["function"]["arguments"])
        assert (call["function"]["name"] == "get_weather" and valid_weather(arguments)) or \
            (call["function"]["name"] == "get_time" and arguments["zone"] in ("UTC", "CET"))
    streamed = [c["choices"][0]["delta"]["tool_calls"][0] for c in stream(tool_server, body)
                if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert [d["function"] for d in streamed] == [c["function"] for c in choice["message"]["tool_calls"]]


def test_without_parallel_calls_required_makes_exactly_one(tool_server):
    body = chat(tool_server, max_completion_tokens=80, relat=DIRECT, tools=[WEATHER, TIME], tool_choice="required",
                parallel_tool_calls=False)
    choice = tool_server.http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1
    assert not ToolUse("auto", ("get_weather", "get_time"), parallel=False) or \
        len(parse_reply(REPLY, ToolUse("auto", ("get_weather", "get_time"), parallel=False))[1]) == 1


def test_tools_reach_the_prompt_and_tool_results_are_read(tool_server):
    """The prompt grows by the tools' description; a conversation ending with a tool result is served."""
    plain = tool_server.http.post("/v1/chat/completions", json=chat(tool_server, relat=DIRECT)).json()
    with_tools = tool_server.http.post("/v1/chat/completions", json=chat(
        tool_server, relat=DIRECT, tools=[WEATHER], tool_choice="auto")).json()
    assert with_tools["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 40
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    reply = tool_server.http.post("/v1/chat/completions", json={**chat(tool_server, relat=RELAT, tools=[WEATHER]),
                                                                "messages": messages})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] > with_tools["usage"]["prompt_tokens"]


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
])
def test_bad_tool_fields_are_a_400_naming_them(tool_server, fields, param):
    assert_error(tool_server.http.post("/v1/chat/completions", json=chat(tool_server, **fields)), 400, param=param)


def test_tools_on_a_template_without_tool_support_are_a_400(plain_server):
    reply = plain_server.http.post("/v1/chat/completions", json=chat(plain_server, tools=[WEATHER]))
    assert "no tool support" in assert_error(reply, 400, param="tools")["message"]


# -- reading calls out of text (tool_choice auto) --------------------------------------------------------------

AUTO = ToolUse("auto", ("get_weather", "get_time"))
REPLY = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
         '\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')


def test_hermes_calls_are_parsed_out_of_the_text():
    content, calls = parse_reply(REPLY, AUTO)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "UTC"})]
    assert len({c.id for c in calls}) == 2
    # Not a call: a broken body, or an unknown tool's name, stays in the text.
    for text in ["<tool_call>{not json}</tool_call>", '<tool_call>{"name": "rm", "arguments": {}}</tool_call>']:
        assert parse_reply(text, AUTO) == (text, [])
    assert parse_reply("plain", AUTO) == ("plain", [])
    assert parse_reply("plain", None) == ("plain", [])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 11, len(REPLY)])
def test_auto_streams_content_and_each_call_whole_whatever_the_pieces(size):
    stream = ToolStream(AUTO)
    pieces = [REPLY[i:i + size] for i in range(0, len(REPLY), size)]
    out = [item for piece in pieces for item in stream.feed(piece)] + stream.finish()
    content = "".join(text for text, call in out if text)
    calls = [call for _, call in out if call is not None]
    assert content.strip() == "Let me check." and "<tool" not in content
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris", "days": 2}), (1, "get_time", {"zone": "UTC"})]
    assert stream.calls == 2


def test_auto_streams_text_that_only_looks_like_a_tag_as_content():
    stream = ToolStream(AUTO)
    out = stream.feed("a <tool") + stream.feed("box> b <tool_call>oops") + stream.finish()
    assert "".join(text for text, _ in out) == "a <toolbox> b <tool_call>oops" and stream.calls == 0

