"""The adapter cache through HTTP: a repeated request hits on both endpoints, streamed or not, and answers as the
first did; `relat.cache: false` bypasses it; the metrics count hits, misses, evictions and bytes."""

from __future__ import annotations

import pytest
from relat_server.settings import Settings

from relat_core import AdapterCache, Engine

from .conftest import build_tiny
from .server_support import QUESTION, data_events, metrics, one_torch_thread, ready_server, sample, sse_lines

TRAINING = {"method": "relat", "steps": 2, "latent_steps": 2, "rank": 4}


@pytest.fixture(scope="module")
def server(tokenizer):
    # Two entries: a third training evicts the least recently used.
    engine = Engine(build_tiny("qwen3", tokenizer, seed=7), max_rank=8, num_slots=2,
                    adapter_cache=AdapterCache(max_entries=2, max_bytes=64 << 20))
    with one_torch_thread(), ready_server(engine) as served:
        yield served


def chat(server, question: str, stream: bool = False, **relat) -> dict:
    body = {"model": server.model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_completion_tokens": 5, "stream": stream, "relat": {**TRAINING, **relat}}
    if not stream:
        return server.http.post("/v1/chat/completions", json=body).json()
    with server.http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = data_events(sse_lines(response))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    trace = next(e["relat"] for e in events[:-1] if e.get("relat"))
    return {"choices": [{"message": {"content": text}}], "relat": trace}


def native(server, question: str, stream: bool = False) -> dict:
    body = {"question": question, "temperature": 0, "max_tokens": 5, "stream": stream, **TRAINING}
    if not stream:
        return server.http.post("/v1/relat", json=body).json()
    with server.http.stream("POST", "/v1/relat", json=body) as response:
        lines = list(sse_lines(response))
    steps = sum(line == "event: ttt_step" for line in lines)
    done = data_events(lines)[-1]
    return {**done, "ttt_step_events": steps}


def test_a_repeated_request_hits_on_both_endpoints_streamed_or_not(server):
    before = metrics(server.url)
    question = QUESTION[0]["content"]
    first = chat(server, question)
    assert first["relat"]["cache"] == "miss"
    for again in (chat(server, question), chat(server, question, stream=True)):
        assert again["relat"]["cache"] == "hit"
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert again["relat"]["steps"] == first["relat"]["steps"]
    plain = native(server, "Name a prime number.")
    assert plain["trace"]["cache"] == "miss"
    streamed = native(server, "Name a prime number.", stream=True)
    assert streamed["trace"]["cache"] == "hit" and streamed["ttt_step_events"] == 0  # no training step ran
    assert streamed["answer"] == plain["answer"]
    after = metrics(server.url)
    assert sample(after, "relat_adapter_cache_hits_total") - sample(before, "relat_adapter_cache_hits_total") == 3
    assert sample(after, "relat_adapter_cache_misses_total") - sample(before, "relat_adapter_cache_misses_total") == 2
    assert sample(after, "relat_adapter_cache_entries") == 2 and sample(after, "relat_adapter_cache_bytes") > 0


def test_cache_false_trains_afresh(server):
    chat(server, "What colour is the sky?")
    bypass = chat(server, "What colour is the sky?", cache=False)
    assert bypass["relat"]["cache"] is None and len(bypass["relat"]["steps"]) == 2


def test_least_recently_used_is_evicted_and_counted(server):
    before = sample(metrics(server.url), "relat_adapter_cache_evictions_total")
    for question in ("One?", "Two?", "Three?"):
        assert chat(server, question)["relat"]["cache"] == "miss"
    assert chat(server, "One?")["relat"]["cache"] == "miss"  # evicted by the third, in a cache of two
    assert sample(metrics(server.url), "relat_adapter_cache_evictions_total") - before >= 2


# -- n > 1 ------------------------------------------------------------------------------------------------------

def test_n_answers_through_both_endpoints_streamed_or_not(server):
    body = {"model": server.model, "messages": [{"role": "user", "content": "Say something."}], "n": 3, "seed": 4,
            "temperature": 1.0, "max_completion_tokens": 6, "relat": {**TRAINING, "cache": False}}
    plain = server.http.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in plain["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in plain["choices"]]
    assert len(set(texts)) > 1 and len(plain["relat"]["steps"]) == 2  # sampled apart, after one training
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                                    "stream_options": {"include_usage": True}}) as r:
        events = data_events(sse_lines(r))
    chunks = [e for e in events[:-1] if e["choices"]]
    streamed = ["".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                        if c["choices"][0]["index"] == k) for k in range(3)]
    assert streamed == texts
    finishing = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(c["choices"][0]["index"] for c in finishing) == [0, 1, 2]
    assert sum(bool(c.get("relat")) for c in chunks) == 1  # one trace: one training
    assert events[-2]["usage"] == plain["usage"]
    one = server.http.post("/v1/chat/completions", json={**body, "n": 1}).json()
    assert one["choices"][0]["message"]["content"] == texts[0]  # answer 0 is the n = 1 answer
    assert plain["usage"]["completion_tokens"] > one["usage"]["completion_tokens"]
    assert plain["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]

    native = {"question": "Say something.", "n": 3, "seed": 4, "temperature": 1.0, "max_tokens": 6,
              **TRAINING, "cache": False}
    result = server.http.post("/v1/relat", json=native).json()
    assert [c["answer"] for c in result["choices"]] == texts and result["answer"] == texts[0]
    with server.http.stream("POST", "/v1/relat", json={**native, "stream": True}) as r:
        lines = list(sse_lines(r))
    tokens = [e for name, e in zip([line for line in lines if line.startswith("event: ")], data_events(lines),
                                   strict=True) if name == "event: token"]
    assert ["".join(t["text"] for t in tokens if t["index"] == k) for k in range(3)] == texts


def test_n_over_the_limit_is_a_400_naming_it(server):
    response = server.http.post("/v1/chat/completions", json={"messages": QUESTION, "n": 3})
    assert response.status_code == 200  # max_concurrency 8 here, max_n 8
    refused = server.http.post("/v1/chat/completions", json={"messages": QUESTION, "n": 9})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
    assert "at most 8 on this server" in refused.json()["error"]["message"]


def test_the_answers_limit_is_max_n_within_the_decoding_rows():
    assert Settings(max_n=8, max_concurrency=2).answers_limit == 2
    assert Settings(max_n=3, max_concurrency=8).answers_limit == 3
