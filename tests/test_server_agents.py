"""Multi-agent requests through the server: the trace and usage of a chat completion, agents in both streams (SSE
comments in chat, `agent` events on /v1/relat), the 400s of their options, the client, `relat ask --url`, and the
operator's prompts file. A tiny random Qwen3 serves; its answers are gibberish, so the tests never read them."""

from __future__ import annotations

import json
import re

import pytest
from openai.types.chat import ChatCompletionChunk
from relat_client import AgentTurn, Done, RelatClient, Token
from relat_server.app import default_loader
from relat_server.cli import main
from relat_server.settings import Settings

from relat_core import Engine

from .conftest import build_tiny
from .server_support import (
    KEY,
    QUESTION,
    assert_error,
    data_events,
    metrics,
    one_torch_thread,
    ready_server,
    sample,
    sse_lines,
)

SEQUENTIAL = ("planner", "critic", "refiner")  # the agents before the judger, who answers
HIERARCHICAL = ("maths", "science", "code")  # before the summariser
AGENT_COMMENT = re.compile(r": agent (\w+) done \((latent, \d+ latent positions|text, \d+ tokens), \d+\.\d\d s\)")


@pytest.fixture(scope="module")
def server(tokenizer):
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=2), num_slots=2)) as served:
        yield served


def chat_body(relat: dict, **fields) -> dict:
    return {"messages": QUESTION, "max_completion_tokens": 5, "temperature": 0, "relat": relat, **fields}


def test_text_agents_are_traced_and_every_token_is_counted(server):
    before = metrics(server.url)
    body = chat_body({"agents": "sequential", "method": "direct", "agent_max_tokens": 4})
    completion = server.http.post("/v1/chat/completions", json=body).json()
    trace, usage = completion["relat"], completion["usage"]
    assert (trace["agents"], trace["answer_format"]) == ("sequential", "text")
    turns = trace["agent_turns"]
    assert [turn["role"] for turn in turns] == [*SEQUENTIAL, "judger"]
    assert [turn["kind"] for turn in turns] == ["text"] * 3 + ["answer"]
    for turn in turns[:3]:
        assert isinstance(turn["text"], str) and 1 <= turn["completion_tokens"] <= 4
    # Usage is what the request cost: every agent's prompt and every token generated, the agents' included.
    assert completion["choices"][0]["finish_reason"] == "length" and turns[-1]["completion_tokens"] == 5
    assert usage["completion_tokens"] == sum(turn["completion_tokens"] for turn in turns)
    assert usage["prompt_tokens"] == sum(turn["prompt_tokens"] for turn in turns)
    after = metrics(server.url)
    assert sample(after, "relat_agent_turns_run_total", kind="text") - \
        sample(before, "relat_agent_turns_run_total", kind="text") == 3


@pytest.mark.parametrize("method, kind", [("latent", "latent"), ("direct", "text")])
def test_chat_stream_reports_agents_as_comments_before_the_answer(server, method, kind):
    relat = {"agents": "sequential", "method": method, "latent_steps": 2, "agent_max_tokens": 3}
    with server.http.stream("POST", "/v1/chat/completions", json=chat_body(relat, stream=True)) as response:
        lines = list(sse_lines(response))
    comments = [AGENT_COMMENT.fullmatch(line) for line in lines if line.startswith(": agent")]
    assert [(match.group(1), match.group(2).split(",")[0]) for match in comments] == [(r, kind) for r in SEQUENTIAL]
    first_content = next(i for i, line in enumerate(lines) if line.startswith("data: ") and '"content":"' in line
                         and '"role"' not in line)
    assert max(lines.index(match.string) for match in comments) < first_content
    events = data_events(lines)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:  # still a valid OpenAI stream, chunk by chunk
        ChatCompletionChunk.model_validate(event)
    assert [turn["kind"] for turn in events[-2]["relat"]["agent_turns"]] == [kind] * 3 + ["answer"]


def test_native_stream_sends_agent_events_before_the_answer(server):
    body = {"question": "What is 7 times 6?", "max_tokens": 4, "temperature": 0, "stream": True,
            "agents": "hierarchical", "method": "latent", "latent_steps": 2}
    with server.http.stream("POST", "/v1/relat", json=body) as response:
        lines = list(sse_lines(response))
    names = [line[7:] for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names[:3] == ["agent"] * 3 and set(names[3:-1]) == {"token"} and names[-1] == "done"
    agents = payloads[:3]
    assert [(a["role"], a["kind"], a["latent_positions"]) for a in agents] == [(r, "latent", 2) for r in HIERARCHICAL]
    trace = payloads[-1]["trace"]
    assert trace["agents"] == "hierarchical" and trace["agent_turns"][:3] == agents
    assert trace["agent_turns"][-1]["role"] == "summariser"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", chat_body({"agents": "bogus"}), "relat.agents"),
    ("/v1/chat/completions", chat_body({"agent_max_tokens": 0}), "relat.agent_max_tokens"),
    ("/v1/chat/completions", chat_body({"answer_format": "xml"}), "relat.answer_format"),
    ("/v1/relat", {"question": "q", "agents": "bogus"}, "agents"),
    ("/v1/relat", {"question": "q", "agent_max_tokens": 5000}, "agent_max_tokens"),
    ("/v1/relat", {"question": "q", "answer_format": "xml"}, "answer_format"),
])
def test_bad_agent_options_are_400_naming_the_field(server, path, body, param):
    assert_error(server.http.post(path, json=body), 400, "invalid_value", param)


def test_client_parses_agent_events(server):
    options = {"agents": "sequential", "method": "direct", "agent_max_tokens": 3, "max_tokens": 4,
               "temperature": 0, "answer_format": "boxed"}
    with RelatClient(server.url, api_key=KEY) as client:
        events = list(client.stream("What is 7 times 6?", **options))
    turns = [event for event in events if isinstance(event, AgentTurn)]
    assert [(turn.role, turn.kind) for turn in turns] == [(role, "text") for role in SEQUENTIAL]
    assert all(isinstance(turn.text, str) and turn.latent_positions == 0 for turn in turns)
    first_token = next(i for i, event in enumerate(events) if isinstance(event, Token))
    assert events.index(turns[-1]) < first_token and isinstance(events[-1], Done)
    assert events[-1].result["trace"]["answer_format"] == "boxed"


def test_relat_ask_url_prints_a_line_per_agent(server, capsys):
    flags = ["--url", server.url, "--api-key", KEY, "--agents", "sequential", "--method", "latent",
             "--latent-steps", "2", "--max-tokens", "3"]
    assert main(["ask", *flags, "What is 7 times 6?"]) == 0
    err = capsys.readouterr().err
    for role in SEQUENTIAL:
        assert f"[{role}] latent, " in err and f"  agent {role}: latent, " in err
    assert "agents=sequential" in err and "  agent judger: answer, " in err


def test_the_operators_prompts_file_reaches_the_engine(tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny = build_tiny("qwen3", tokenizer)
    tiny.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"roles": {"planner": "XYZZY plan for: {question}"},
                                   "formats": {"boxed": "Box it, XYZZY."}}))
    settings = Settings(model=str(model_dir), device="cpu", agent_prompts=prompts, max_concurrency=1)
    engine = default_loader(settings)()
    assert engine.agent_prompts.roles["planner"] == "XYZZY plan for: {question}"
    assert engine.agent_prompts.formats["boxed"] == "Box it, XYZZY."
    assert "XYZZY" not in engine.agent_prompts.roles["critic"]  # the roles the file leaves out keep the defaults
