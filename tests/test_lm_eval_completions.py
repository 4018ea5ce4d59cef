"""EleutherAI's lm-eval scores a loglikelihood (multiple-choice) task against `relat serve` as its
`local-completions` model, through POST /v1/completions (echo, logprobs, the prompt as token ids), fully offline.

A real `relat serve` process serves a tiny random Qwen3 saved to a folder; lm-eval tokenizes with that folder's
tokenizer (its huggingface backend), sends each context and option as token ids, and reads the option's tokens'
logprobs out of the echoed prompt. Each loglikelihood lm-eval records must equal the one a plain transformers
forward of the same tokens gives: the server's numbers, not merely a run that finished.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import save_tiny
from .deploy_support import Service
from .server_support import free_port
from .test_lm_eval import KEY, MODEL, lm_eval  # noqa: F401 (lm_eval: the fixture, imported with nothing online)

ITEMS = [
    {"question": "Which planet is known as the red planet?", "choices": ["Mars", "Venus", "Jupiter"], "label": 0},
    {"question": "What do bees make?", "choices": ["milk", "honey"], "label": 1},
]

TASK = """\
task: relat_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    """`relat serve` in its own process on a saved tiny model (the folder's tokenizer is lm-eval's too)."""
    folder = save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", tokenizer, seed=6)
    port = free_port()
    command = [sys.executable, "-m", "relat_server", "serve", "--model", str(folder), "--port", str(port),
               "--served-model-name", MODEL, "--api-key", KEY, "--method", "direct", "--torch-threads", "1"]
    service = Service("relat serve", command, tmp_path_factory.mktemp("serve") / "serve.log",
                      env={**os.environ, "RELAT_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"})
    with service.serving(f"http://127.0.0.1:{port}", "/ready", 180, "readiness"):
        service.folder = folder
        yield service


@pytest.fixture
def task_folder(tmp_path):
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "relat_tiny_choice.yaml").write_text(TASK.format(data=json.dumps(str(data)),
                                                               cache=json.dumps(str(tmp_path / "datasets"))))
    return folder


def test_lm_eval_local_completions_scores_a_loglikelihood_task_with_the_servers_logprobs(lm_eval, served,  # noqa: F811
                                                                                       task_folder):
    from lm_eval.tasks import TaskManager

    model_args = {"base_url": f"{served.url}/v1/completions", "model": MODEL, "num_concurrent": 1, "max_retries": 1,
                  "tokenizer_backend": "huggingface", "tokenizer": str(served.folder), "timeout": 60}
    results = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=["relat_tiny_choice"],
                                      task_manager=TaskManager(include_path=str(task_folder), include_defaults=False),
                                      log_samples=True, bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                      torch_random_seed=None)
    samples = results["samples"]["relat_tiny_choice"]
    assert len(samples) == len(ITEMS)
    assert results["results"]["relat_tiny_choice"]["acc,none"] in (0, 0.5, 1)

    tokenizer = AutoTokenizer.from_pretrained(served.folder)
    model = AutoModelForCausalLM.from_pretrained(served.folder, dtype=torch.float32)
    for sample_ in samples:
        item = ITEMS[sample_["doc_id"]]
        context = f"Question: {item['question']}\nAnswer:"
        assert len(sample_["resps"]) == len(item["choices"])
        for (response,), choice in zip(sample_["resps"], item["choices"], strict=True):
            loglikelihood, _ = response
            # lm-eval's split: the context's tokens, then the continuation's (" " + choice), encoded apart
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            ids = context_ids + whole[len(context_ids):]
            with torch.no_grad():
                table = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            expected = sum(float(table[t - 1, ids[t]]) for t in range(len(context_ids), len(ids)))
            assert loglikelihood == pytest.approx(expected, abs=1e-3)
