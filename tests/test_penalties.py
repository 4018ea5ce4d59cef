"""OpenAI's presence_penalty, frequency_penalty and logit_bias (issue 27, part 4), per row of the decoding batch, on
tiny random Qwen3 and Qwen2 models: each greedy token is the argmax of an independent reference (a plain
transformers forward of the prompt and the answer so far, then OpenAI's formula); a penalised row beside a free
one changes nothing of the free one; bad values are a 400 that names the field."""

from __future__ import annotations

import pytest
import torch

from relat_core import Engine, InvalidParameter, Request, SamplingParams, TTTParams
from relat_core.chat import normalise_messages
from relat_core.decoding import shape_logits

from .conftest import build_tiny
from .server_support import QUESTION, assert_error, chat, one_torch_thread, ready_server
from .test_batching import assert_as_alone, drive

DIRECT = TTTParams(method="direct", answer_format="text")


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def engine(request, tokenizer) -> Engine:
    return Engine(build_tiny(request.param, tokenizer, pack_weights=False), max_rank=8, num_slots=2,
                  decode_share=0.0)


def test_shape_logits_is_openais_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={0: 10.0, 3: -1.0})
    shaped = shape_logits(logits, params, [2, 2, 1, 2])  # token 2 three times, token 1 once
    assert shaped.tolist() == [11.0, 2.0 - 0.25 - 0.5, 3.0 - 3 * 0.25 - 0.5, 3.0]
    assert shape_logits(logits, SamplingParams(), [2]) is logits  # nothing to apply: the same tensor


@torch.no_grad()
def reference_answer(engine: Engine, sampling: SamplingParams) -> list[int]:
    """Greedy decoding by plain forwards of the whole sequence, with OpenAI's formula written out."""
    prompt = engine.chat.segments(normalise_messages(QUESTION), DIRECT.reconstruction_instruction, "restate",
                                  latent=False).prompt_ids
    answer: list[int] = []
    while len(answer) < sampling.max_tokens:
        logits = engine.model(input_ids=torch.tensor([prompt + answer])).logits[0, -1].float()
        for token in set(answer):
            count = answer.count(token)
            logits[token] -= count * sampling.frequency_penalty + sampling.presence_penalty
        for token, bias in sampling.logit_bias.items():
            logits[token] += bias
        token = int(logits.argmax())
        if token in engine.stop_ids:
            break
        answer.append(token)
    return answer


# A random tiny model never repeats a token in 12, so a positive penalty would change nothing here: negative
# ones (OpenAI allows down to -2) make the tokens already chosen likelier, and the answer repeats them.
@pytest.mark.parametrize("sampling", [
    SamplingParams(max_tokens=12, frequency_penalty=-2.0),
    SamplingParams(max_tokens=12, presence_penalty=-2.0, frequency_penalty=0.5),
    SamplingParams(max_tokens=12, logit_bias={7: 4.0, 11: -100.0}),
], ids=["frequency", "presence", "bias"])
def test_each_token_is_the_argmax_of_the_reference(engine, sampling):
    result = engine.run(Request(QUESTION, DIRECT, sampling))
    assert result.token_ids == reference_answer(engine, sampling)
    assert result.token_ids != engine.run(Request(QUESTION, DIRECT, SamplingParams(max_tokens=12))).token_ids


def test_a_penalised_row_beside_a_free_one_changes_nothing_of_it(engine):
    requests = {"free": Request(QUESTION, DIRECT, SamplingParams(max_tokens=8)),
                "penalised": Request(QUESTION, DIRECT, SamplingParams(max_tokens=8, frequency_penalty=2.0,
                                                                      logit_bias={5: 3.0})),
                "sampled": Request(QUESTION, DIRECT, SamplingParams(max_tokens=8, temperature=0.8, seed=4,
                                                                    presence_penalty=1.0))}
    outcomes = drive(engine, requests)
    for request_id, request in requests.items():
        assert_as_alone(engine, request, outcomes[request_id])


def test_engine_refuses_a_bias_past_the_vocabulary(engine):
    vocabulary = engine.lm_head.weight.shape[0]
    with pytest.raises(InvalidParameter) as caught:
        engine.check(Request(QUESTION, DIRECT, SamplingParams(logit_bias={vocabulary: 1.0})))
    assert caught.value.param == "logit_bias"


@pytest.fixture(scope="module")
def server(tokenizer):
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1))) as served:
        yield served


@pytest.mark.parametrize("fields, param", [({"logit_bias": {"abc": 1}}, "logit_bias"),
                                           ({"logit_bias": {"5": 101}}, "logit_bias"),
                                           ({"logit_bias": {"999999999": 1}}, "logit_bias"),
                                           ({"presence_penalty": 2.5}, "presence_penalty"),
                                           ({"frequency_penalty": -3}, "frequency_penalty")])
def test_bad_penalties_and_biases_are_a_400_naming_the_field(server, fields, param):
    assert_error(server.http.post("/v1/chat/completions", json=chat(server, **fields)), 400, param=param)
    native = {"question": "What is 2 + 2?", **fields}
    assert_error(server.http.post("/v1/relat", json=native), 400, param=param)


def test_both_endpoints_apply_them(server):
    base = {"max_tokens": 6, "temperature": 0, "method": "direct"}
    plain = server.http.post("/v1/relat", json={"question": "What is 2 + 2?", **base}).json()
    biased = server.http.post("/v1/relat", json={"question": "What is 2 + 2?", **base,
                                                 "frequency_penalty": 2.0, "logit_bias": {"42": 100}}).json()
    assert plain["answer"] != biased["answer"]
    body = chat(server, frequency_penalty=2.0, logit_bias={"42": 100}, relat={"method": "direct"})
    reply = server.http.post("/v1/chat/completions", json=body).json()
    assert reply["relat"]["ignored_fields"] == []  # served, so not ignored
