"""The legacy Completions endpoint and what it needs of the engine (issue 27, part 5), on tiny random models: a raw
prompt read as it is; each prompt token's logprob (echo with logprobs) equal to a log-softmax over a plain
transformers forward of the same tokens, the base model's for direct and the trained adapter's (loaded by PEFT from
its export) for relat; continuations scored as the answer after one training; OpenAI's shape, streamed and not,
for a prompt list with n; and a 400 naming the field for what it refuses."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from relat_core import Engine, InvalidParameter, Request, SamplingParams, TTTParams

from .conftest import build_tiny
from .server_support import assert_error, data_events, one_torch_thread, ready_server, sse_lines

SEED = 4
PROMPT = "Question: Which planet is known as the red planet?\nAnswer:"
DIRECT = TTTParams(method="direct")
# A high learning rate: an adapter far enough from the base model that matching logprobs mean something.
TRAINED = TTTParams(steps=2, latent_steps=2, lr=0.05, rank=4, alpha=8, gate="none", answer_context="question")


@pytest.fixture(scope="module")
def engine(tokenizer):
    with one_torch_thread():
        yield Engine(build_tiny("qwen3", tokenizer, seed=SEED), max_rank=8, num_slots=4)


@pytest.fixture(scope="module")
def server(engine):
    with ready_server(engine, max_concurrency=4, method="direct", batch_window=0) as served:
        yield served


def prompt_ids(engine: Engine, text: str = PROMPT) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


@torch.no_grad()
def reference(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of a plain forward: row t is the distribution of token t + 1."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def expected_logprobs(model, ids: list[int]) -> list[float]:
    table = reference(model, ids)
    return [float(table[t - 1, ids[t]]) for t in range(1, len(ids))]


def peft_model(tokenizer, result, folder):
    """A fresh copy of the base model with the request's exported adapter loaded by PEFT."""
    result.adapter.save(folder)
    return PeftModel.from_pretrained(build_tiny("qwen3", tokenizer, seed=SEED).model, str(folder))


# -- the engine ------------------------------------------------------------------------------------------------

def test_a_raw_prompts_logprobs_are_the_base_models_for_direct(engine):
    ids = prompt_ids(engine)
    result = engine.run(Request(prompt=PROMPT, ttt=DIRECT, sampling=SamplingParams(max_tokens=0, prompt_logprobs=3)))
    assert result.finish_reason == "length" and result.token_ids == [] and result.usage.completion_tokens == 0
    assert result.prompt_token_ids == ids and result.usage.prompt_tokens == len(ids)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(ids)
    table = reference(engine.model, ids)
    for position, entry in enumerate(result.prompt_logprobs[1:], 1):
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(float(table[position - 1, ids[position]]), abs=1e-4)
        values, top = table[position - 1].topk(3)
        assert [text for text, _ in entry.top] == [engine.tokenizer.decode([i]) for i in top.tolist()]
        assert [value for _, value in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    # token ids are read as sent, and give the same
    by_ids = engine.run(Request(prompt=ids, ttt=DIRECT, sampling=SamplingParams(max_tokens=0, prompt_logprobs=0)))
    assert [e.logprob for e in by_ids.prompt_logprobs[1:]] == pytest.approx(expected_logprobs(engine.model, ids),
                                                                           abs=1e-4)


@pytest.mark.parametrize("answer_context", ["question", "thought"])
def test_relats_prompt_logprobs_are_the_adapted_models(engine, tokenizer, tmp_path, answer_context):
    """The prompt read on the way to the answer runs through the trained adapter: PEFT's forward with the exported
    adapter gives the same logprobs, and they are not the base model's."""
    ttt = TRAINED.replace(answer_context=answer_context)
    result = engine.run(Request(prompt=PROMPT, ttt=ttt, sampling=SamplingParams(max_tokens=2, prompt_logprobs=0),
                                return_adapter=True))
    assert len(result.trace.steps) == 2 and result.trace.aborted is None
    ids = prompt_ids(engine)
    served = [entry.logprob for entry in result.prompt_logprobs[1:]]
    adapted = expected_logprobs(peft_model(tokenizer, result, tmp_path / "adapter"), ids)
    base = expected_logprobs(engine.model, ids)
    assert served == pytest.approx(adapted, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(served, base, strict=True)) > 1e-2


def test_continuations_are_scored_as_the_answer_after_one_training(engine, tokenizer, tmp_path):
    options = [" Mars", " Venus is", " Jupiter"]
    result = engine.run(Request(prompt=PROMPT, ttt=TRAINED, continuations=options, return_adapter=True))
    assert len(result.trace.steps) == 2  # one training for every option
    assert [c.index for c in result.choices] == [0, 1, 2] and [c.text for c in result.choices] == options
    model = peft_model(tokenizer, result, tmp_path / "adapter")
    ids = prompt_ids(engine)
    for choice, option in zip(result.choices, options, strict=True):
        tokens = tokenizer(option, add_special_tokens=False)["input_ids"]
        assert choice.token_ids == tokens and choice.finish_reason == "length"
        expected = expected_logprobs(model, ids + tokens)[len(ids) - 1:]
        assert [e.logprob for e in choice.logprobs] == pytest.approx(expected, abs=1e-4)
    direct = engine.run(Request(prompt=PROMPT, ttt=DIRECT, continuations=options))
    tokens = tokenizer(options[1], add_special_tokens=False)["input_ids"]
    assert [e.logprob for e in direct.choices[1].logprobs] == \
        pytest.approx(expected_logprobs(engine.model, ids + tokens)[len(ids) - 1:], abs=1e-4)


@pytest.mark.parametrize("request_, param", [
    (Request(prompt=""), "prompt"),
    (Request(prompt=[10**7]), "prompt"),
    (Request(messages=[{"role": "user", "content": "Hi"}], prompt="Hi"), "prompt"),
    (Request(prompt="Hi", ttt=TTTParams(agents="sequential")), "agents"),
    (Request(prompt="Hi", continuations=[""]), "continuations"),
    (Request(prompt="Hi", ttt=TTTParams(gate="confidence"), sampling=SamplingParams(max_tokens=0)), "gate"),
])
def test_the_engine_refuses_naming_the_field(engine, request_, param):
    with pytest.raises(InvalidParameter) as raised:
        engine.check(request_)
    assert raised.value.param == param


# -- the server ------------------------------------------------------------------------------------------------

def completion(server, **fields) -> dict:
    return {"model": server.model, "prompt": PROMPT, "temperature": 0, **fields}


def test_echo_with_logprobs_and_no_tokens_is_the_prompts_loglikelihood(server, engine):
    """What a loglikelihood request sends: echo, logprobs and max_tokens 0 (lm-eval sends 1, and drops the last)."""
    ids = prompt_ids(engine)
    expected = expected_logprobs(engine.model, ids)
    body = server.http.post("/v1/completions", json=completion(server, max_tokens=0, echo=True, logprobs=2,
                                                               unknown_field=1)).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice, = body["choices"]
    assert choice["text"] == PROMPT and choice["index"] == 0 and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [engine.tokenizer.decode([i]) for i in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) >= 2 and top[token] == pytest.approx(value) for top, token, value in
               zip(logprobs["top_logprobs"][1:], logprobs["tokens"][1:], logprobs["token_logprobs"][1:], strict=True))
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert body["relat"]["method"] == "direct" and body["relat"]["ignored_fields"] == ["unknown_field"]
    # lm-eval's own request: token ids, max_tokens 1, logprobs 1; its last token is the one generated
    lm_eval = server.http.post("/v1/completions", json=completion(server, prompt=[ids, ids[:5]], max_tokens=1,
                                                                  echo=True, logprobs=1)).json()
    first, second = lm_eval["choices"]
    assert [first["index"], second["index"]] == [0, 1]
    assert first["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert len(first["logprobs"]["tokens"]) == len(ids) + 1 and len(second["logprobs"]["tokens"]) == 6


def test_a_prompt_list_with_n_is_indexed_prompt_major(server):
    prompts = ["The sky is", "Two plus two is"]
    body = server.http.post("/v1/completions", json=completion(server, prompt=prompts, n=2, max_tokens=3,
                                                               temperature=0.9, seed=7, echo=True)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for choice in body["choices"]:
        assert choice["text"].startswith(prompts[choice["index"] // 2]) and choice["logprobs"] is None
    assert len(body["relat"]["prompt_traces"]) == 2 and body["usage"]["completion_tokens"] <= 12


def test_the_stream_carries_what_the_response_does(server):
    fields = completion(server, max_tokens=6, logprobs=1, stream_options={"include_usage": True})
    whole = server.http.post("/v1/completions", json=fields).json()
    with server.http.stream("POST", "/v1/completions", json={**fields, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = data_events(sse_lines(response))
    assert events[-1] == "[DONE]" and events[-2]["usage"] == whole["usage"]
    chunks = [event for event in events[:-2] if event["choices"]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    streamed = [lp for c in chunks if c["choices"][0]["logprobs"] for lp in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed == whole["choices"][0]["logprobs"]["tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["relat"]["method"] == "direct"
    with server.http.stream("POST", "/v1/completions", json={**fields, "stream": True, "echo": True,
                                                              "logprobs": None}) as response:
        echoed = [e for e in data_events(sse_lines(response)) if e != "[DONE]" and e["choices"]]
    assert echoed[0]["choices"][0]["text"] == PROMPT


def test_relat_continuations_on_the_server(server, engine):
    options = [" Mars", " Venus"]
    relat = {"method": "relat", "steps": 1, "latent_steps": 1, "gate": "none", "continuations": options}
    body = server.http.post("/v1/completions", json=completion(server, logprobs=0, relat=relat, n=3)).json()
    assert [c["text"] for c in body["choices"]] == options and len(body["relat"]["steps"]) == 1
    assert all(len(c["logprobs"]["token_logprobs"]) == len(engine.tokenizer(o)["input_ids"])
               for c, o in zip(body["choices"], options, strict=True))


@pytest.mark.parametrize("fields, param", [
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"suffix": "!"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**7]}, "prompt"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"relat": {"latent_step": 2}}, "relat.latent_step"),
    ({"relat": {"method": "relat", "gate": "confidence"}, "max_tokens": 0}, "relat.gate"),
])
def test_bad_inputs_are_400s_naming_the_field(server, fields, param):
    assert_error(server.http.post("/v1/completions", json=completion(server, **fields)), 400, param=param)
