"""Token logprobs (issue 27, part 1) on tiny random Qwen3 and Qwen2 models: each answer token's logprob, and the top
ones at its position, equal a log-softmax over a plain transformers forward of the same tokens; the text deltas
carry them in order, as the finished choice does; penalties and temperature do not change them (vLLM's raw mode);
a request the gate keeps has direct's; the server returns OpenAI's shape on both endpoints, streamed and not."""

from __future__ import annotations

import json

import pytest
import torch

from relat_core import Engine, Request, SamplingParams, TextDelta, TTTParams
from relat_core.chat import normalise_messages

from .conftest import build_tiny
from .server_support import QUESTION, assert_error, chat, one_torch_thread, ready_server, sse_lines

DIRECT = TTTParams(method="direct", answer_format="text")


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    return Engine(build_tiny(request.param, tokenizer, pack_weights=False), max_rank=8, num_slots=2,
                  decode_share=0.0)


@torch.no_grad()
def reference(engine: Engine, answer: list[int]) -> torch.Tensor:
    """log-softmax of a plain forward over the prompt and the answer: row t is the distribution of answer token t."""
    prompt = engine.chat.segments(normalise_messages(QUESTION), DIRECT.reconstruction_instruction, "restate",
                                  latent=False).prompt_ids
    logits = engine.model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(answer)], dim=-1)


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_tokens=8, logprobs=True, top_logprobs=3),
    SamplingParams(max_tokens=8, logprobs=True, top_logprobs=2, temperature=0.7, seed=5, frequency_penalty=1.0),
], ids=["greedy", "sampled-penalised"])
def test_logprobs_equal_a_plain_forwards_log_softmax(engine, sampling):
    events = list(engine.generate(Request(QUESTION, DIRECT, sampling)))
    result = events[-1].result
    choice = result.choices[0]
    expected = reference(engine, result.token_ids)
    assert [entry.token_id for entry in choice.logprobs] == result.token_ids
    for position, entry in enumerate(choice.logprobs):
        assert entry.logprob == pytest.approx(float(expected[position, entry.token_id]), abs=1e-4)
        values, ids = expected[position].topk(sampling.top_logprobs)
        assert [text for text, _ in entry.top] == [engine.tokenizer.decode([i]) for i in ids.tolist()]
        assert [value for _, value in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert entry.text == engine.tokenizer.decode([entry.token_id])
    streamed = [entry for event in events if isinstance(event, TextDelta) for entry in event.logprobs]
    assert streamed == choice.logprobs  # every token's once, in order


def test_no_logprobs_unless_asked_and_a_kept_request_has_directs(engine):
    plain = engine.run(Request(QUESTION, DIRECT, SamplingParams(max_tokens=4)))
    assert plain.choices[0].logprobs is None
    sampling = SamplingParams(max_tokens=6, logprobs=True)
    direct = engine.run(Request(QUESTION, DIRECT, sampling))
    kept = engine.run(Request(QUESTION, DIRECT.replace(method="relat", steps=1, latent_steps=1, gate="confidence",
                                                       gate_threshold=0.0), sampling))
    assert kept.trace.gated is True
    expected = [entry.logprob for entry in direct.choices[0].logprobs]
    assert [entry.logprob for entry in kept.choices[0].logprobs] == pytest.approx(expected)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(ValueError, match="top_logprobs needs logprobs"):
        SamplingParams(top_logprobs=2)
    with pytest.raises(ValueError, match="top_logprobs must be an integer in"):
        SamplingParams(logprobs=True, top_logprobs=21)


@pytest.fixture(scope="module")
def server(tokenizer):
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1))) as served:
        yield served


def test_chat_returns_openais_logprobs_shape_streamed_and_not(server):
    body = chat(server, logprobs=True, top_logprobs=2, relat={"method": "direct"})
    reply = server.http.post("/v1/chat/completions", json=body).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6
    assert "".join(entry["token"] for entry in content) == reply["choices"][0]["message"]["content"]
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        chunks = [json.loads(line[6:]) for line in sse_lines(streamed)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    entries = [entry for chunk in chunks for choice in chunk["choices"] if choice.get("logprobs")
               for entry in choice["logprobs"]["content"]]
    assert entries == content
    plain = server.http.post("/v1/chat/completions", json=chat(server, relat={"method": "direct"})).json()
    assert plain["choices"][0]["logprobs"] is None


def test_native_endpoint_returns_them_too(server):
    reply = server.http.post("/v1/relat", json={"question": "What is 2 + 2?", "method": "direct", "max_tokens": 5,
                                                "temperature": 0, "logprobs": True}).json()
    assert len(reply["logprobs"]["content"]) == reply["usage"]["completion_tokens"]
    assert all(entry["top_logprobs"] == [] for entry in reply["logprobs"]["content"])


@pytest.mark.parametrize("fields, param", [({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                                           ({"top_logprobs": 2}, "top_logprobs"),
                                           ({"logprobs": "yes"}, "logprobs")])
def test_bad_logprobs_fields_are_a_400_naming_them(server, fields, param):
    assert_error(server.http.post("/v1/chat/completions", json=chat(server, **fields)), 400, param=param)
