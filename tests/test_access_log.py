"""The access log (issue 28, audit): one JSON line per request with its tenant, route, status, tokens, seconds and
cache outcome; never the key, the prompt or the answer, unless --log-prompts."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from relat_server.access_log import AccessLog, RequestRecord

from relat_core import AdapterCache, Engine

from .conftest import build_tiny
from .server_support import KEY, one_torch_thread, ready_server, wait_for

KEY_A = "sk-audited-tenant-key"
PROMPT = "Zebra quartz umbrella: what colour is the sky?"
TRAINING = {"method": "relat", "steps": 2, "latent_steps": 2, "rank": 4}


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(build_tiny("qwen3", tokenizer, seed=3), max_rank=8, num_slots=2,
                  adapter_cache=AdapterCache(max_entries=8, max_bytes=64 << 20))


def serve(engine, folder, **settings):
    keys = folder / "keys.json"
    keys.write_text(json.dumps({"tenants": [{"name": "a", "key_sha256": hashlib.sha256(KEY_A.encode()).hexdigest()}]}))
    return ready_server(engine, keys_file=str(keys), access_log=str(folder / "access.jsonl"), **settings)


def lines(folder, count: int) -> list[dict]:
    """The log's lines once `count` are there (a line is written as its response ends)."""
    path = folder / "access.jsonl"
    wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= count, f"{count} log lines")
    return [json.loads(line) for line in path.read_text().splitlines()]


def chat(question: str, **relat) -> dict:
    return {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_completion_tokens": 4,
            "relat": {**TRAINING, **relat}}


def test_each_request_is_one_line_with_no_key_prompt_or_answer(engine, tmp_path):
    with one_torch_thread(), serve(engine, tmp_path) as server:
        as_a = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120)
        first = as_a.post("/v1/chat/completions", json=chat(PROMPT)).json()
        again = as_a.post("/v1/chat/completions", json=chat(PROMPT)).json()
        with server.http.stream("POST", "/v1/relat", json={"question": PROMPT, "max_tokens": 3, "stream": True,
                                                           "temperature": 0, "cache": False, **TRAINING}) as stream:
            assert stream.status_code == 200 and list(stream.iter_lines())
        completion = as_a.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0,
                                                         "relat": {"method": "direct"}}).json()
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat(PROMPT),
                             headers={"Authorization": "Bearer sk-wrong-key"})
        assert refused.status_code == 401
        httpx.get(f"{server.url}/health")  # probes and metrics are not logged
        httpx.get(f"{server.url}/metrics")
        log = lines(tmp_path, 5)
        text = (tmp_path / "access.jsonl").read_text()
    assert len(log) == 5
    assert [(line["tenant"], line["method"], line["route"], line["status"]) for line in log] == [
        ("a", "POST", "/v1/chat/completions", 200), ("a", "POST", "/v1/chat/completions", 200),
        ("default", "POST", "/v1/relat", 200), ("a", "POST", "/v1/completions", 200),
        (None, "POST", "/v1/chat/completions", 401)]
    assert [line["cache"] for line in log] == ["miss", "hit", "none", "none", "none"]  # direct consults none
    for line, usage in zip(log, (first["usage"], again["usage"], None, completion["usage"]), strict=False):
        if usage is not None:
            assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"],
                                                                           usage["completion_tokens"])
    assert log[2]["completion_tokens"] > 0 and log[4]["prompt_tokens"] == 0
    assert all(line["seconds"] >= 0 and line["time"].endswith("+00:00") and line["request_id"] for line in log)
    assert set(log[0]) == {"time", "request_id", "tenant", "method", "route", "status", "seconds",
                           "prompt_tokens", "completion_tokens", "cache"}
    # What must never be there: any key (or its digest), the prompt, any answer.
    answers = [first["choices"][0]["message"]["content"], completion["choices"][0]["text"]]
    secrets = [KEY, KEY_A, "sk-wrong-key", hashlib.sha256(KEY_A.encode()).hexdigest(), PROMPT, "Zebra quartz"]
    assert not [s for s in secrets + [a for a in answers if len(a.strip()) > 3] if s in text]


def test_log_prompts_adds_the_prompt_and_the_answer(engine, tmp_path):
    with one_torch_thread(), serve(engine, tmp_path, log_prompts=True) as server:
        answer = server.http.post("/v1/chat/completions", json=chat(PROMPT)).json()
        (line,) = lines(tmp_path, 1)
    assert line["prompts"] == [[{"role": "user", "content": PROMPT}]]
    assert line["answers"] == [answer["choices"][0]["message"]["content"]]
    assert KEY not in json.dumps(line)


def test_a_dash_writes_to_stderr(capsys):
    log = AccessLog("-")
    log.write(RequestRecord(None, 0.0, RequestRecord.now()), "id", "GET", "/v1/models", 401, 0.01)
    line = json.loads(capsys.readouterr().err)
    assert (line["route"], line["status"], line["tenant"], line["cache"]) == ("/v1/models", 401, None, "none")
    assert not AccessLog(None).enabled
