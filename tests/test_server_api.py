"""The HTTP API end to end: a real uvicorn server on 127.0.0.1 serving a tiny random Qwen3, driven by the official
`openai` package and by plain HTTP. Answers of a random model are gibberish; the tests compare them, never read them.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from relat_server.settings import Settings

from relat_core import Engine, TrainStep
from relat_core.engine import Failed
from relat_core.loading import weights_digest

from .conftest import build_tiny
from .server_support import (
    KEY,
    QUESTION,
    SLOW,
    assert_error,
    chat,
    data_events,
    metrics,
    one_torch_thread,
    ready_server,
    sample,
    serve_in_thread,
    sse_lines,
    wait_for,
)

MAX_PROMPT_TOKENS = 256
MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def engine(tokenizer):
    with one_torch_thread():
        yield Engine(build_tiny("qwen3", tokenizer, seed=1))


@pytest.fixture(scope="module")
def server(engine):
    with ready_server(engine, api_keys=[KEY, "sk-second"], max_prompt_tokens=MAX_PROMPT_TOKENS,
                      max_body_bytes=MAX_BODY_BYTES) as served:
        yield served


@pytest.fixture
def sdk(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, body, path="/v1/chat/completions", headers: dict | None = None) -> httpx.Response:
    """POST a JSON value, or raw text as a JSON body."""
    if isinstance(body, dict | list):
        return server.http.post(path, json=body, headers=headers)
    return server.http.post(path, content=body, headers={"Content-Type": "application/json", **(headers or {})})


# -- the official SDK -------------------------------------------------------------------------------------------

def test_openai_sdk_answers_streamed_and_not_alike(server, sdk):
    extra = {"relat": {"steps": 3, "latent_steps": 2}}
    completion = sdk.chat.completions.create(model=server.model, messages=QUESTION, max_completion_tokens=8,
                                             temperature=0, seed=3, extra_body=extra)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == server.model
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    trace = completion.model_extra["relat"]
    assert trace["method"] == "relat" and [s["step"] for s in trace["steps"]] == [1, 2, 3]
    assert set(trace["timings"]) >= {"train_s", "think_s", "decode_s", "total_s"}

    stream = sdk.chat.completions.create(model=server.model, messages=QUESTION, max_completion_tokens=8,
                                         temperature=0, seed=3, extra_body=extra, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == choice.finish_reason
    losses = [step["loss"] for step in trace["steps"]]
    assert [step["loss"] for step in finishing[0].model_extra["relat"]["steps"]] == losses
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == completion.usage.completion_tokens


def test_openai_sdk_sees_errors_as_its_own_exceptions(server, sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model=server.model, messages=QUESTION, n=9)  # over max_n
    assert caught.value.body["param"] == "n"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=server.model, messages=QUESTION)
    assert [m.id for m in sdk.models.list()] == [server.model]


def test_multi_turn_and_content_parts(server):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    as_parts = post(server, chat(server, messages=messages, seed=1)).json()
    messages[-1]["content"] = "What is 2+2?"
    as_text = post(server, chat(server, messages=messages, seed=1)).json()
    assert as_parts["choices"][0]["message"]["content"] == as_text["choices"][0]["message"]["content"]
    assert as_parts["usage"]["prompt_tokens"] > post(server, chat(server)).json()["usage"]["prompt_tokens"]


def test_answer_quality_options_reach_the_engine_from_both_endpoints(server):
    """The options of issue 9 go through the chat `relat` object and the native endpoint's top level alike, and the
    trace reports them as they ran; both endpoints give the same answer."""
    options = {"steps": 2, "latent_steps": 2, "mapping": "soft", "soft_top_k": 16, "guidance": 0.5,
               "contrastive_eta": 0.25, "answer_context": "thought"}
    chat_result = post(server, chat(server, max_completion_tokens=5, relat=options)).json()
    native = post(server, {"question": QUESTION[0]["content"], "max_tokens": 5, "temperature": 0, **options},
                  "/v1/relat").json()
    for trace in (chat_result["relat"], native["trace"]):
        assert (trace["guidance"], trace["contrastive_eta"], trace["answer_context"]) == (0.5, 0.25, "thought")
    assert chat_result["choices"][0]["message"]["content"] == native["answer"]
    question = post(server, chat(server, max_completion_tokens=5, relat={"steps": 1, "answer_context": "question"}))
    assert question.json()["relat"]["answer_context"] == "question"
    assert question.json()["relat"]["adapter_during_answer"] is True


# -- the native endpoint --------------------------------------------------------------------------------------

def test_native_endpoint_streams_typed_events_and_agrees_with_its_result(server):
    body = {"question": "Why is the sky blue?", "max_tokens": 6, "temperature": 0, "steps": 3, "latent_steps": 2}
    result = post(server, body, "/v1/relat").json()
    assert result["object"] == "relat.result" and len(result["trace"]["steps"]) == 3
    with server.http.stream("POST", "/v1/relat", json={**body, "stream": True}) as response:
        assert response.headers["x-accel-buffering"] == "no"
        lines = list(sse_lines(response))
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names[:3] == ["ttt_step"] * 3 and names[-1] == "done" and set(names[3:-1]) <= {"token"}
    payloads = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [p["step"] for p in payloads[:3]] == [1, 2, 3]
    assert "".join(p["text"] for p in payloads[3:-1]) == payloads[-1]["answer"] == result["answer"]


# -- probes and headers -----------------------------------------------------------------------------------------

def test_probes_need_no_key_and_the_api_does(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert_error(httpx.get(f"{server.url}/v1/models"), 401, "invalid_api_key")
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-second"}).status_code == 200


def test_request_id_is_echoed_or_made(server):
    echoed = post(server, chat(server), headers={"X-Request-Id": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    made = post(server, chat(server), headers={"X-Request-Id": "bad id\twith spaces"})
    assert made.headers["x-request-id"] not in ("", "bad id\twith spaces")
    error = post(server, "[]", headers={"X-Request-Id": "err-7"})
    assert error.status_code == 400 and error.headers["x-request-id"] == "err-7"
    with server.http.stream("POST", "/v1/chat/completions", json=chat(server, stream=True),
                            headers={"X-Request-Id": "stream-1"}) as response:
        assert response.headers["x-request-id"] == "stream-1"


# -- each error for real --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ("[1, 2]", None),
    ('"a string"', None),
    ("42", None),
    ("", None),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
    ({"messages": QUESTION, "n": 9}, "n"),  # over max_n (8)
    ({"messages": QUESTION, "n": 0}, "n"),
    ({"messages": QUESTION, "temperature": -1}, "temperature"),
    ({"messages": QUESTION, "relat": {"steps": 101}}, "relat.steps"),
    ({"messages": QUESTION, "relat": {"rank": 512}}, "relat.rank"),
    ({"messages": QUESTION, "relat": {"rank": 100}}, "relat.rank"),  # within TTTParams, above the max_rank 16
    ({"messages": QUESTION, "relat": {"method": "relat", "latent_steps": 0}}, "relat.latent_steps"),
    ({"messages": QUESTION, "relat": "steps=3"}, "relat"),
])
def test_400_for_invalid_requests(server, body, param):
    assert_error(post(server, body), 400, param=param)


def test_400_on_the_native_endpoint_names_top_level_fields(server):
    assert_error(post(server, {"question": "q", "steps": -1}, "/v1/relat"), 400, param="steps")
    assert_error(post(server, {"steps": 1}, "/v1/relat"), 400, param="question")


def test_401_without_or_with_a_wrong_key(server):
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=chat(server)), 401, "invalid_api_key")
    for header in ("Bearer sk-wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x"):
        response = httpx.post(f"{server.url}/v1/relat", json={"question": "q"}, headers={"Authorization": header})
        assert_error(response, 401, "invalid_api_key")


def test_404_for_an_unknown_model_or_path(server):
    assert_error(post(server, chat(server, model="gpt-4o")), 404, "model_not_found", "model")
    assert_error(post(server, {"question": "q", "model": "other"}, "/v1/relat"), 404, "model_not_found")
    assert_error(server.http.get("/v1/nothing-here"), 404)


def test_413_for_a_body_over_the_limit_declared_or_streamed(server):
    huge = json.dumps(chat(server, messages=[{"role": "user", "content": "x" * MAX_BODY_BYTES}]))
    assert_error(post(server, huge), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    response = server.http.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


def test_413_for_a_prompt_over_the_token_limit(server):
    long_question = [{"role": "user", "content": "word " * (MAX_PROMPT_TOKENS + 10)}]
    assert_error(post(server, chat(server, messages=long_question)), 413, "context_length_exceeded", "messages")
    assert post(server, chat(server, messages=[{"role": "user", "content": "word " * 100}])).status_code == 200


def test_500_without_a_stack_trace_when_the_engine_fails(server, engine, monkeypatch):
    """A request that fails alone (a Failed event), then a whole engine step that raises once it has trained."""
    real_step = engine.step
    failures = iter(["one request", "the batch"])

    def exploding():
        keys = list(engine._sequences)
        events = real_step()
        if any(isinstance(event, TrainStep) for _, event in events):
            return events
        if next(failures) == "the batch":
            raise RuntimeError("secret engine internals")
        return [(key, Failed(RuntimeError("secret engine internals"))) for key in keys]

    monkeypatch.setattr(engine, "step", exploding)
    before = metrics(server.url)
    error = assert_error(post(server, chat(server)), 500, "internal_error")
    assert "secret" not in json.dumps(error) and "Traceback" not in json.dumps(error)

    with server.http.stream("POST", "/v1/chat/completions", json=chat(server, stream=True)) as response:
        assert response.status_code == 200  # the stream had begun: the error comes as an event
        lines = list(sse_lines(response))
    assert any(line.startswith(": ttt step 2/2 loss") for line in lines)
    events = data_events(lines)
    assert events[-2]["error"]["code"] == "internal_error" and events[-1] == "[DONE]"
    assert "secret" not in "\n".join(lines)
    after = metrics(server.url)
    assert sample(after, "relat_errors_total", code="500") - sample(before, "relat_errors_total", code="500") == 2
    assert sample(after, "relat_requests_total", method="relat", outcome="error") - \
        sample(before, "relat_requests_total", method="relat", outcome="error") == 2


def test_500_from_the_server_itself_keeps_the_shape_and_the_request_id(server, monkeypatch):
    service = server.app.state.service

    class BrokenTokenizer:
        def apply_chat_template(self, *args, **kwargs):
            raise KeyError("secret template internals")

    monkeypatch.setattr(service, "tokenizer", BrokenTokenizer())
    response = post(server, chat(server), headers={"X-Request-Id": "broken-1"})
    error = assert_error(response, 500, "internal_error")
    assert "secret" not in json.dumps(error) and response.headers["x-request-id"] == "broken-1"


# -- determinism, isolation and metrics ---------------------------------------------------------------------

def test_concurrent_requests_answer_as_when_sent_alone_and_leave_the_base_weights(server, engine):
    bodies = [chat(server, seed=seed, temperature=0.9, max_completion_tokens=6, relat={"steps": 2, "latent_steps": 3})
              for seed in (1, 2, 3, 1)]
    checksum = weights_digest(engine.model)
    alone = [post(server, body).json() for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: post(server, body).json(), bodies * 2))
    answers = [r["choices"][0]["message"]["content"] for r in alone]
    assert [r["choices"][0]["message"]["content"] for r in together] == answers * 2
    assert answers[0] == answers[3] and len(set(answers[:3])) > 1  # the seed decides, and it does matter
    losses = [[s["loss"] for s in r["relat"]["steps"]] for r in alone]
    assert [[s["loss"] for s in r["relat"]["steps"]] for r in together] == losses * 2
    assert weights_digest(engine.model) == checksum


def test_metrics_parse_and_histograms_count_what_was_sent(server):
    before = metrics(server.url)
    sent = [(steps, seed) for steps, seed in ((1, 1), (2, 2), (3, 3))]
    results, texts = [], []
    for steps, seed in sent:
        with server.http.stream("POST", "/v1/chat/completions", json=chat(
                server, seed=seed, relat={"steps": steps, "latent_steps": 2}, stream=True,
                stream_options={"include_usage": True})) as response:
            events = data_events(sse_lines(response))
        texts.append([e["choices"][0]["delta"]["content"] for e in events[1:-1]
                      if e != "[DONE]" and e["choices"] and e["choices"][0]["delta"].get("content")])
        results.append(next(e for e in events if e != "[DONE]" and e.get("usage")))
    assert_error(post(server, "[]"), 400)
    after = metrics(server.url)

    def grew(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("relat_requests_total", method="relat", outcome="success") == 3
    for histogram in ("relat_request_queue_time_seconds", "relat_e2e_request_latency_seconds",
                      "relat_ttt_time_seconds", "relat_ttt_steps", "relat_recon_loss_before",
                      "relat_recon_loss_after"):
        assert grew(histogram + "_count") == 3, histogram
    assert grew("relat_ttt_steps_sum") == 1 + 2 + 3
    assert grew("relat_ttt_steps_bucket", le="1.0") == 1 and grew("relat_ttt_steps_bucket", le="+Inf") == 3
    assert grew("relat_time_to_first_token_seconds_count") == sum(1 for t in texts if t)
    assert grew("relat_inter_token_latency_seconds_count") == sum(max(len(t) - 1, 0) for t in texts)
    assert grew("relat_prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in results)
    assert grew("relat_generation_tokens_total") == sum(r["usage"]["completion_tokens"] for r in results)
    assert grew("relat_errors_total", code="400") == 1
    assert sample(after, "relat_requests_running") == sample(after, "relat_requests_waiting") == 0
    assert sample(after, "relat_adapter_slots_in_use") == 0


# -- limits -------------------------------------------------------------------------------------------------------

LIMITS = {"max_steps": 3, "max_latent_steps": 3, "max_rank": 4, "max_agent_tokens": 8}
CONTEXT = 64  # max_model_len: QUESTION's prompt is 37 tokens on the embedded tokenizer, which leaves 27


@pytest.fixture(scope="module")
def limited(engine):
    """A server with tight limits, a short context and /metrics behind the key."""
    with ready_server(engine, metrics_need_key=True, max_model_len=CONTEXT, **LIMITS) as served:
        yield served


def queued_and_refused(server) -> tuple[float, float]:
    """Requests that reached the queue, and 400s (this server's /metrics needs the key)."""
    text = server.http.get("/metrics").text
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    queued = sum(value for (name, _), value in values.items() if name == "relat_requests_total")
    return queued, sample(values, "relat_errors_total", code="400")


@pytest.mark.parametrize("name, setting", [("steps", "max_steps"), ("latent_steps", "max_latent_steps"),
                                           ("rank", "max_rank"), ("agent_max_tokens", "max_agent_tokens")])
def test_each_limit_is_a_400_naming_the_field_before_the_request_queues(limited, name, setting):
    limit = LIMITS[setting]
    before = queued_and_refused(limited)
    over = {name: limit + 1}
    for response, param in ((post(limited, chat(limited, relat=over)), f"relat.{name}"),
                            (post(limited, {"question": "q", **over}, "/v1/relat"), name)):
        error = assert_error(response, 400, "invalid_value", param)
        assert error["message"] == f"{param}: {name} must be at most {limit} on this server, got {limit + 1}"
    queued, refused = queued_and_refused(limited)
    assert (queued, refused) == (before[0], before[1] + 2)  # counted as errors, never as requests that queued
    at_limit = {"steps": 1, "latent_steps": 1, name: limit}
    assert post(limited, chat(limited, max_completion_tokens=2, relat=at_limit)).status_code == 200


def test_max_tokens_must_fit_in_the_context_after_the_prompt(limited):
    prompt = post(limited, chat(limited, max_completion_tokens=1)).json()["usage"]["prompt_tokens"]
    room = CONTEXT - prompt
    for body, path, param in ((chat(limited, max_completion_tokens=room + 1), "/v1/chat/completions",
                               "max_completion_tokens"),
                              ({**chat(limited), "max_completion_tokens": None, "max_tokens": room + 1},
                               "/v1/chat/completions", "max_tokens"),
                              ({"question": QUESTION[0]["content"], "max_tokens": room + 1}, "/v1/relat",
                               "max_tokens")):
        error = assert_error(post(limited, body, path), 400, "context_length_exceeded", param)
        assert f"context is {CONTEXT} tokens: the prompt's {prompt} leave {room}" in error["message"]
    fits = post(limited, chat(limited, max_completion_tokens=room, ignore_eos=True)).json()["usage"]
    assert fits["total_tokens"] == CONTEXT
    # Left out, the answer's length is the server's default (256) cut to what the context leaves, as in vLLM.
    default = post(limited, {**chat(limited, ignore_eos=True), "max_completion_tokens": None}).json()["usage"]
    assert default["completion_tokens"] == room


def test_a_prompt_that_fills_the_context_is_a_413(limited):
    long_question = [{"role": "user", "content": "word " * CONTEXT}]
    error = assert_error(post(limited, chat(limited, messages=long_question)), 413, "context_length_exceeded",
                         "messages")
    assert f"the model's context is {CONTEXT}" in error["message"]


def test_the_models_defaults_are_kept_within_the_limits(limited, engine):
    assert engine.defaults.latent_steps > LIMITS["max_latent_steps"]
    body = chat(limited, max_completion_tokens=2, relat={"method": "latent"})
    assert post(limited, body).json()["relat"]["latent_steps"] == LIMITS["max_latent_steps"]


# -- security -----------------------------------------------------------------------------------------------------

def test_a_key_is_needed_on_every_route_but_the_probes(limited):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/relat"),
                         ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/metrics"),
                         ("GET", "/v1/chat/completions"), ("GET", "/no/such/path"), ("GET", "/admin/status")):
        response = httpx.request(method, f"{limited.url}{path}", json={})
        assert_error(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer", path
    for path in ("/health", "/ready"):
        assert httpx.get(f"{limited.url}{path}").status_code == 200
    # The playground's page and files hold no data: the page asks for the key (tests/test_playground.py).
    for path in ("/", "/static/playground.js", "/static/playground.css"):
        assert httpx.get(f"{limited.url}{path}").status_code == 200, path
    assert_error(httpx.get(f"{limited.url}/static/nothing"), 404, "not_found")
    assert limited.http.get("/metrics").status_code == 200
    assert limited.http.get("/openapi.json").json()["openapi"].startswith("3.1")
    assert_error(limited.http.get("/v1/chat/completions"), 405, "method_not_allowed")  # past the key: routing
    assert_error(limited.http.get("/no/such/path"), 404, "not_found")


def test_admin_status_sees_the_base_weights_slots_and_requests_as_they_are(server, engine):
    status = server.http.get("/admin/status").json()
    digest = weights_digest(engine.model)
    assert status["base_weights_sha256"] == status["base_weights_sha256_at_start"] == digest
    assert status["base_weights_unchanged"] and status["phase"] == "ready"
    assert status["weights"] == engine.weights_format == "fp32"  # a tiny random model: auto keeps fp32
    assert (status["adapter_slots"], status["adapter_slots_in_use"]) == (engine.bank.num_slots, 0)
    assert (status["requests_running"], status["requests_waiting"]) == (0, 0)
    assert status["resident_memory_bytes"] > 0
    # While a relat request trains, its slot and its place in the engine show; once its client leaves, they are free.
    with server.http.stream("POST", "/v1/relat", json={"question": "q", "stream": True, **SLOW}) as response:
        assert response.status_code == 200
        busy = wait_for(lambda: (s := server.http.get("/admin/status").json())["adapter_slots_in_use"] and s,
                        "the request's slot")
        assert busy["requests_running"] == 1
    wait_for(lambda: server.http.get("/admin/status").json()["adapter_slots_in_use"] == 0, "the slot to be freed")
    # A change to a base weight, as a request that leaked into the model would make, is seen.
    weight = engine.model.get_input_embeddings().weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0
    try:
        changed = server.http.get("/admin/status").json()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert not changed["base_weights_unchanged"] and changed["base_weights_sha256"] != digest
    assert changed["base_weights_sha256_at_start"] == digest
    assert server.http.get("/admin/status").json()["base_weights_unchanged"]


def test_metrics_are_open_by_default_as_in_vllm(server):
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert_error(httpx.get(f"{server.url}/openapi.json"), 401)


def test_keys_are_compared_in_constant_time(server, monkeypatch):
    """Every key is compared, equal-length digests, whichever matches and whatever is sent."""
    import hmac

    compared = []
    real = hmac.compare_digest

    def counting(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    service = server.app.state.service
    for header in (f"Bearer {KEY}".encode(), b"Bearer sk-second", b"Bearer wrong", b"Bearer " + b"x" * 1000, b""):
        compared.clear()
        try:
            service.authorize(header)
        except Exception:
            pass
        assert compared == [(32, 32), (32, 32)], header


def test_keys_never_reach_the_log(server, caplog):
    import logging

    with caplog.at_level(logging.DEBUG):
        post(server, chat(server))
        httpx.post(f"{server.url}/v1/chat/completions", json=chat(server),
                   headers={"Authorization": "Bearer sk-guess"})
        httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert caplog.records
    assert KEY not in caplog.text and "sk-guess" not in caplog.text and "sk-second" not in caplog.text


@pytest.mark.parametrize("sent", ["caf\u00e9-1", "x" * 129, "two words", "semi;colon", "quote\"d", ""])
def test_a_client_request_id_is_replaced_unless_short_and_plain(server, caplog, sent):
    import logging

    with caplog.at_level(logging.INFO, logger="relat_server"):
        response = post(server, chat(server), headers={"X-Request-Id": sent.encode("latin-1")})
    made = response.headers["x-request-id"]
    assert response.status_code == 200 and made != sent and len(made) == 32 and made.isalnum()
    assert f"request {made}:" in caplog.text
    assert not sent or sent not in caplog.text


def test_control_characters_never_make_it_into_a_request_id(server):
    """h11 refuses them on the wire; an ASGI server that passed them on would still not see them echoed."""
    import asyncio

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/health", headers={"X-Request-Id": "a\r\nX-Injected: 1"})

    response = asyncio.run(send())
    assert "x-injected" not in response.headers and "\n" not in response.headers["x-request-id"]
    assert len(response.headers["x-request-id"]) == 32


# -- loading ----------------------------------------------------------------------------------------------------

def test_ready_is_503_while_loading_and_requests_are_refused(engine):
    loaded = threading.Event()

    def slow_load() -> Engine:
        loaded.wait(60)
        return engine

    with serve_in_thread(Settings(), slow_load) as served:
        url = served.url
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/ready").status_code == 503
        assert_error(httpx.post(f"{url}/v1/chat/completions", json=chat(engine.name)), 503, "not_ready")
        loaded.set()
        wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, "readiness")
        assert httpx.post(f"{url}/v1/chat/completions", json=chat(engine.name), timeout=60).status_code == 200
        # No keys on this server: the admin route, which anyone could make hash the weights, is refused.
        assert_error(httpx.get(f"{url}/admin/status"), 403, "keys_required")


def test_a_model_that_fails_to_load_makes_the_server_unhealthy():
    def broken() -> Engine:
        raise OSError("no such model")

    with serve_in_thread(Settings(), broken) as served:
        url = served.url
        wait_for(lambda: served.app.state.service.phase == "failed", "the failure")
        assert httpx.get(f"{url}/health").status_code == 503
        assert httpx.get(f"{url}/ready").status_code == 503
        assert_error(httpx.post(f"{url}/v1/relat", json={"question": "q"}), 503, "not_ready")
