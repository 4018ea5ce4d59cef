"""Strict where the API is ours (issue 27, part 7): an unknown field of the `relat` object or of /v1/relat is a 400
that names it, with the closest known name; an unknown top-level field of OpenAI's own chat request is ignored as
vLLM does, and listed in the response's trace (`ignored_fields`), streamed and not."""

from __future__ import annotations

import json

import pytest

from relat_core import Engine

from .conftest import build_tiny
from .server_support import assert_error, chat, one_torch_thread, ready_server, sse_lines


@pytest.fixture(scope="module")
def server(tokenizer):
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1))) as served:
        yield served


def test_a_typo_in_the_relat_object_is_a_400_with_the_closest_name(server):
    error = assert_error(server.http.post("/v1/chat/completions", json=chat(server, relat={"latent_step": 16})),
                         400, param="relat.latent_step")
    assert error["message"] == "relat.latent_step: unknown field; did you mean latent_steps?"


def test_a_typo_on_the_native_endpoint_is_a_400_with_the_closest_name(server):
    error = assert_error(server.http.post("/v1/relat", json={"question": "What is 2 + 2?", "gatee": "none"}), 400,
                         param="gatee")
    assert error["message"] == "gatee: unknown field; did you mean gate?"


def test_openais_fields_this_server_does_not_serve_are_listed_in_the_trace(server):
    body = chat(server, service_tier="auto", prediction=None, relat={"method": "direct"})
    reply = server.http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["relat"]["ignored_fields"] == ["prediction", "service_tier"]
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        chunks = [json.loads(line[6:]) for line in sse_lines(streamed)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    traces = [chunk["relat"] for chunk in chunks if chunk.get("relat")]
    assert len(traces) == 1 and traces[0]["ignored_fields"] == ["prediction", "service_tier"]
    plain = server.http.post("/v1/chat/completions", json=chat(server, relat={"method": "direct"})).json()
    assert plain["relat"]["ignored_fields"] == []
