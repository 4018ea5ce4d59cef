"""What `relat eval` writes into its --out folder, and how a stopped run resumes.

The folder holds:
- `records.jsonl`: one JSON line per (data file, item, variant), appended as each request finishes and flushed,
  so that a run stopped at any moment loses only the requests in flight. A rerun with the same folder skips every
  (data, index, variant) already there. Fields:
    data            the data file's name (`gsm8k_test_dev.jsonl`)
    index           the item's index among the file's non-blank lines
    task            "knowledge", "maths", "choice" or "code"
    variant         the variant's name
    options         the variant's request options as given on the command line ({"method": "relat", ...})
    question        the item's question, as the file has it (the prompt sent adds the task's instruction)
    correct         whether the reply scores (relat_eval.tasks)
    reply           the model's answer
    gold            the expected answer, as text
    predicted       what the scorer read from the reply (a number, a letter; for code the program's verdict)
    finish_reason   "stop" or "length"
    prompt_tokens, completion_tokens
    recon_before, recon_after   relat's training loss before and after training: the reconstruction's, or that of
                    the variant's objective (null for direct/latent)
    steps_run       training steps that ran
    gated           the gate kept direct's answer (true), trained (false), or no gate ran (null)
    signals         the trace's signals: l0, draft_entropy, draft_margin, draft_logprob, draft_confidence,
                    auto_score, loss_drop, agreement, those measured
    seconds         the request's latency, from admission (or the HTTP call) to its answer
    timings         the trace's seconds per phase: train_s, think_s, first_token_s, decode_s, total_s
    run, run_s      the run's id (its start time) and the seconds from the run's start to this answer
    error           null, or the failure of a request that got no answer (it scores as wrong)
- `run.json`: one entry per run that wrote records (model, machine, date, the variants' full options), read by the
  report.
- `report.md` and `*.png`: the report (relat_eval.report), rewritten after every run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORDS = "records.jsonl"
RUNS = "run.json"

Key = tuple[str, int, str]  # (data, index, variant): what makes a record unique


def record_key(record: dict[str, Any]) -> Key:
    return record["data"], record["index"], record["variant"]


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every record in `folder`, in the order written. A last line cut off mid-write (the process was killed) is
    dropped: its request runs again."""
    path = folder / RECORDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RecordWriter:
    """Appends records to `folder/records.jsonl`, one flushed line each."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / RECORDS
        # A line cut off by a kill would glue itself to the next record: end it first.
        needs_newline = False
        if path.exists() and path.stat().st_size > 0:
            with path.open("rb") as file:
                file.seek(-1, 2)
                needs_newline = file.read(1) != b"\n"
        self.file = path.open("a", encoding="utf-8")
        if needs_newline:
            self.file.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_runs(folder: Path) -> list[dict[str, Any]]:
    path = folder / RUNS
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def add_run(folder: Path, run: dict[str, Any]) -> None:
    """Append a run's description (model, machine, date, variants) to `run.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = read_runs(folder) + [run]
    (folder / RUNS).write_text(json.dumps(runs, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def done_keys(records: Iterable[dict[str, Any]]) -> set[Key]:
    return {record_key(r) for r in records}
