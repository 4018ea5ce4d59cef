"""`relat eval --mc-scoring loglik` on a tiny random model: each multiple-choice option's text is scored as the
answer's continuation of a raw prompt (the sum of its tokens' logprobs) and the likeliest is the model's choice;
for relat, one training per question scores every option. The scores are checked against a plain transformers
forward of the same tokens, in this process and through a server alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from relat_eval import tasks
from relat_eval.records import read_records, read_runs
from relat_server.cli import main as relat
from relat_server.settings import Settings

import relat_core
from relat_core import Engine

from .conftest import build_tiny
from .server_support import serve_in_thread, wait_for

ITEMS = [{"question": "Which planet is red?", "choices": ["Mars", "Venus", "the Moon"], "answer": "A"},
         {"question": "What do bees make?", "choices": ["milk", "honey"], "answer": "B"}]
VARIANTS = "direct,relat=relat:steps=1:latent_steps=1:gate=none"


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny("qwen3", tokenizer, seed=8)
    torch.set_num_threads(threads)


@pytest.fixture
def local_model(monkeypatch, tiny_model):
    monkeypatch.setattr(relat_core, "load_model", lambda *args, **kwargs: tiny_model)
    return tiny_model


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "choice.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    return path


def reference_scores(model, item: dict) -> list[float]:
    """Each option's loglikelihood after the raw prompt, from a plain forward of the base model."""
    tokenizer = model.tokenizer
    prompt = tokenizer(tasks.loglik_prompt(item))["input_ids"]
    scores = []
    for option in tasks.loglik_continuations(item):
        tokens = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model.model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
        table = torch.log_softmax(logits, dim=-1)
        scores.append(sum(float(table[len(prompt) - 1 + t, token]) for t, token in enumerate(tokens)))
    return scores


def check_records(records: list[dict], model) -> None:
    assert sorted((r["index"], r["variant"]) for r in records) == [(0, "direct"), (0, "relat"), (1, "direct"),
                                                                   (1, "relat")]
    for record in records:
        item = ITEMS[record["index"]]
        scores = [option["logprob"] for option in record["option_scores"]]
        assert record["error"] is None and record["scoring"] == "loglik"
        assert [o["text"] for o in record["option_scores"]] == tasks.loglik_continuations(item)
        best = max(range(len(scores)), key=scores.__getitem__)
        assert record["predicted"] == "ABC"[best] and record["correct"] == (record["predicted"] == item["answer"])
        assert record["reply"] == tasks.loglik_continuations(item)[best]
        if record["variant"] == "direct":
            assert scores == pytest.approx(reference_scores(model, item), abs=1e-3)
        else:  # one training for every option of the question
            assert record["steps_run"] == 1 and record["recon_before"] is not None
            assert scores != pytest.approx(reference_scores(model, item), abs=1e-3)


def test_loglik_scoring_in_process(tmp_path, data, local_model):
    out = tmp_path / "out"
    assert relat(["eval", "--data", str(data), "--variants", VARIANTS, "--mc-scoring", "loglik", "--out", str(out),
                  "--batch", "2"]) == 0
    check_records(read_records(out), local_model)
    (run,) = read_runs(out)
    assert run["data"][0]["mc_scoring"] == "loglik"
    # an --out scored one way does not take the other
    with pytest.raises(SystemExit, match="scored by loglik"):
        relat(["eval", "--data", str(data), "--variants", VARIANTS, "--out", str(out)])


def test_loglik_scoring_through_a_server(tmp_path, data, tiny_model):
    engine = Engine(tiny_model, num_slots=2)
    out = tmp_path / "out"
    with serve_in_thread(Settings(), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        assert relat(["eval", "--data", str(data), "--variants", VARIANTS, "--mc-scoring", "loglik", "--url",
                      served.url, "--concurrency", "2", "--out", str(out)]) == 0
    check_records(read_records(out), tiny_model)
