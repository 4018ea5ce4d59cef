"""EleutherAI's lm-eval harness evaluates `relat serve` as its `local-chat-completions` model (docs/eval.md).

A real `relat serve` process serves a tiny random Qwen3; lm-eval runs a task written here over a local JSONL file,
fully offline. The task's `generation_kwargs` carry a `relat` object, which lm-eval puts into every request's body;
the server's own default method is `direct`, so its per-method request counter shows whether the object arrived,
and a task with an out-of-range `latent_steps` must fail on the server's 400. Answers of a random model are
gibberish: the test counts and compares them, never reads them.
"""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest

from .conftest import save_tiny
from .deploy_support import Service
from .server_support import free_port, metrics, sample, wait_for

KEY = "sk-lm-eval-test"
MODEL = "tiny-eval"
ITEMS = [
    {"question": "What is the capital of France?", "answer": "Paris"},
    {"question": "What is 2 + 3?", "answer": "5"},
    {"question": "What colour is a clear daytime sky?", "answer": "blue"},
]
RELAT = {"method": "latent", "latent_steps": 2}

TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer in one word."
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
  relat: {relat}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def lm_eval():
    """lm-eval, imported with nothing able to reach a model hub; its API models read the key from OPENAI_API_KEY."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                            "OPENAI_API_KEY": KEY}.items():
            env.setenv(name, value)
        try:
            import lm_eval
        except ImportError:
            reason = "lm-eval is not installed (pip install -e '.[eval]')"
            if os.environ.get("CI") == "true":
                pytest.fail(f"under CI the lm-eval test must run: {reason}")
            pytest.skip(reason)
        yield lm_eval


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    """`relat serve` in its own process: API keys on, and `direct` as its default method."""
    folder = save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", tokenizer, seed=5)
    port = free_port()
    command = [sys.executable, "-m", "relat_server", "serve", "--model", str(folder), "--port", str(port),
               "--served-model-name", MODEL, "--api-key", KEY, "--method", "direct", "--torch-threads", "1"]
    service = Service("relat serve", command, tmp_path_factory.mktemp("serve") / "serve.log",
                      env={**os.environ, "RELAT_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"})
    with service.serving(f"http://127.0.0.1:{port}", "/ready", 180, "readiness"):
        yield service


@pytest.fixture
def tasks(tmp_path):
    """The include path of two tasks over the same three questions: `relat_tiny_qa` asks for `latent` with two
    latent steps; `relat_tiny_qa_bad` asks for 1000 latent steps, beyond the server's range (0..256)."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, relat in (("relat_tiny_qa", RELAT), ("relat_tiny_qa_bad", {**RELAT, "latent_steps": 1000})):
        (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=json.dumps(str(data)),
                                                         cache=json.dumps(str(tmp_path / "datasets")),
                                                         relat=json.dumps(relat)))
    return folder


def evaluate(lm_eval, server, tasks: list[str], include_path) -> dict:
    """lm-eval's Python API, as its CLI runs it, but indexing only these tasks (its thousands of built-in ones take
    tens of seconds) and leaving the test process's random generators alone."""
    from lm_eval.tasks import TaskManager

    model_args = {"base_url": f"{server.url}/v1/chat/completions", "model": MODEL, "num_concurrent": 1,
                  "max_retries": 1, "tokenizer_backend": None, "timeout": 60}
    return lm_eval.simple_evaluate(model="local-chat-completions", model_args=model_args, tasks=tasks,
                                   task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
                                   apply_chat_template=True, log_samples=True, bootstrap_iters=0,
                                   random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # not ours


def test_lm_eval_scores_relat_serve_with_the_tasks_relat_options(lm_eval, server, tasks):
    before = metrics(server.url)
    results = evaluate(lm_eval, server, ["relat_tiny_qa"], tasks)

    assert results["results"]["relat_tiny_qa"]["exact_match,none"] in (0, 1 / 3, 2 / 3, 1)
    samples = results["samples"]["relat_tiny_qa"]
    assert len(samples) == len(ITEMS) == results["n-samples"]["relat_tiny_qa"]["effective"]
    assert sorted(s["target"] for s in samples) == sorted(item["answer"] for item in ITEMS)
    (prompt, gen_kwargs), = samples[0]["arguments"]  # one request per document: ((chat as JSON,), gen kwargs)
    assert all(s["arguments"][0][1]["relat"] == RELAT for s in samples)

    # Every request reached the server carrying the task's method, not the server's default.
    def counted(values, method):
        return sample(values, "relat_requests_total", method=method, outcome="success")

    # (the server counts a request just after its answer leaves, so the last one may be a moment late)
    def all_counted():
        values = metrics(server.url)
        return values if counted(values, "latent") - counted(before, "latent") >= len(ITEMS) else None

    after = wait_for(all_counted, "the server to count the latent requests", limit=30)
    assert counted(after, "latent") - counted(before, "latent") == len(ITEMS)
    assert counted(after, "direct") == counted(before, "direct")

    # The answers lm-eval scored are the server's: the same request, sent again, answers the same (greedy).
    body = {"model": MODEL, "messages": json.loads(prompt[0]), "max_tokens": gen_kwargs["max_gen_toks"],
            "temperature": 0, "stop": ["\n"], "seed": 1234, "relat": RELAT}
    again = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"})
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == samples[0]["resps"][0][0]


def test_an_out_of_range_relat_option_in_the_task_fails_on_the_server(lm_eval, server, tasks):
    """latent_steps reaches the server's checks too: 1000 is refused with 400, and lm-eval gives up."""
    import requests

    before = sample(metrics(server.url), "relat_errors_total", code="400")
    with pytest.raises(requests.HTTPError, match="400"):
        evaluate(lm_eval, server, ["relat_tiny_qa_bad"], tasks)
    assert sample(metrics(server.url), "relat_errors_total", code="400") > before
