"""n > 1 in the engine, on a tiny random Qwen3: one training and one thought, then n answers sampled apart (answer k
from seed + k, answer 0 the n = 1 answer), the same in a batch with other requests as alone, guided or not; usage
counts every answer; cancelling frees every row and the slot."""

from __future__ import annotations

import pytest
import torch

from relat_core import Engine, Request, SamplingParams, TextDelta, TrainStep, TTTParams

from .conftest import build_tiny

QUESTION = [{"role": "user", "content": "Which planet is known as the red planet?"}]
TRAIN = TTTParams(method="relat", latent_steps=3, steps=2, lr=2e-2, rank=4)


@pytest.fixture(scope="module")
def engine(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(build_tiny("qwen3", tokenizer, seed=9), max_rank=8, num_slots=3)
    torch.set_num_threads(threads)


def sampling(seed: int, n: int = 1, **fields) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 8, "temperature": 1.0, "seed": seed, "n": n, **fields})


def events(engine: Engine, request: Request) -> list:
    return list(engine.generate(request))


@pytest.mark.parametrize("ttt", [TTTParams(method="direct"), TTTParams(method="latent", latent_steps=3),
                                 TTTParams(method="latent", latent_steps=3, guidance=0.5)],
                         ids=["direct", "latent", "guided"])
def test_without_training_answer_k_is_the_answer_of_seed_plus_k(engine, ttt):
    """With no adapter to train (whose initialisation the seed also draws), a request with seed s + k is the same
    request as answer k's: each answer samples from its own generator, seeded s + k."""
    result = events(engine, Request(QUESTION, ttt, sampling(20, n=3)))[-1].result
    alone = [engine.run(Request(QUESTION, ttt, sampling(20 + k))) for k in range(3)]
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.token_ids for c in result.choices] == [r.token_ids for r in alone]
    assert len({tuple(c.token_ids) for c in result.choices}) > 1  # sampled apart


@pytest.mark.parametrize("ttt", [TRAIN, TRAIN.replace(answer_context="question"), TRAIN.replace(guidance=0.5)],
                         ids=["relat", "relat-question", "relat-guided"])
def test_n_answers_after_one_training(engine, ttt):
    stream = events(engine, Request(QUESTION, ttt, sampling(20, n=3)))
    result = stream[-1].result
    assert sum(isinstance(e, TrainStep) for e in stream) == 2  # one training for the three answers
    one = engine.run(Request(QUESTION, ttt, sampling(20)))
    assert (result.text, result.token_ids) == (one.text, one.token_ids)  # answer 0 is the n = 1 answer
    assert [s["loss"] for s in result.trace.steps] == [s["loss"] for s in one.trace.steps]
    assert len({tuple(c.token_ids) for c in result.choices}) > 1  # sampled apart
    again = engine.run(Request(QUESTION, ttt, sampling(20, n=3)))
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in result.choices]  # same seed, same answers
    texts = ["".join(e.text for e in stream if isinstance(e, TextDelta) and e.index == k) for k in range(3)]
    assert texts == [c.text for c in result.choices]
    assert result.usage.completion_tokens == sum(len(c.token_ids) for c in result.choices)
    assert result.usage.prompt_tokens == one.usage.prompt_tokens
    assert sorted(engine.bank.free) == [0, 1, 2]


def test_n_answers_in_a_batch_with_others_are_those_it_gets_alone(engine):
    requests = {"a": Request(QUESTION, TRAIN, sampling(5, n=2)), "b": Request(QUESTION, TRAIN, sampling(8)),
                "c": Request([{"role": "user", "content": "Name a colour."}], TTTParams(method="latent"),
                             sampling(3, n=3, max_tokens=5))}
    for request_id, request in requests.items():
        engine.add_request(request_id, request)
    results = {}
    while engine.has_unfinished_requests:
        for request_id, event in engine.step():
            if hasattr(event, "result"):
                results[request_id] = event.result
    for request_id, request in requests.items():
        alone = engine.run(request)
        assert [c.token_ids for c in results[request_id].choices] == [c.token_ids for c in alone.choices], request_id
    assert sorted(engine.bank.free) == [0, 1, 2] and engine.answerer.decoding is None


def test_a_cancelled_request_takes_all_its_answers_with_it(engine):
    stream = engine.generate(Request(QUESTION, TRAIN, sampling(1, n=3, max_tokens=50, ignore_eos=True)))
    for event in stream:
        if isinstance(event, TextDelta):
            break
    stream.close()
    assert engine.answerer.decoding is None and sorted(engine.bank.free) == [0, 1, 2]
    assert not engine.has_unfinished_requests
