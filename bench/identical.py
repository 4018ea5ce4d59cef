"""Do the engine's answers at the defaults stay the same, token for token? A check for refactors.

A refactor of relat_core (issue 25 split the engine and Huginn into packages) must not change what a request
answers. This script runs the embedded model (SmolLM2-135M-Instruct) in-process at the engine's defaults (method
relat, with gate none so that every request trains; greedy, `relat eval`'s prompts and max_tokens per task, no
adapter cache) on every question of bench/data/knowledge_dev.jsonl and every code task (bench/data/code_tasks.jsonl,
code_mbpp_examples.jsonl), one request at a time, and compares each answer's token ids with a recorded file.
Requests run alone because a batch's make-up depends on timing (the engine's decode share is measured in seconds),
and a batch of another make-up may round differently; one thread count for recording and checking, for the same
reason.

    python bench/identical.py --record          # write bench/results/identical-answers.jsonl (about 40 min here)
    python bench/identical.py                   # compare: exit 1 on any answer that differs
    python bench/identical.py --limit 2         # the first 2 items of each file only
    python bench/identical.py --record --file new.jsonl && python bench/identical.py --answers new.jsonl
                                                # record now, compare later (or on another checkout's record)

The record's first line says which code and machine wrote it. Exit status: 0 when every answer checked is the
recorded one, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "data"
RECORD = BENCH / "results" / "identical-answers.jsonl"
FILES = ("knowledge_dev.jsonl", "code_tasks.jsonl", "code_mbpp_examples.jsonl")


def load_items(limit: int | None, files: tuple[str, ...] = FILES) -> list[tuple[str, int, dict]]:
    items = []
    for name in files:
        lines = (DATA / name).read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        items += [(name, index, item) for index, item in enumerate(rows[:limit])]
    return items


def answer_all(items: list[tuple[str, int, dict]], threads: int, model: str | None):
    """Yield one record per item, in order, each request run alone on one engine."""
    import torch
    from relat_eval import tasks

    from relat_core import Engine, Request, SamplingParams, load_model

    torch.set_num_threads(threads)
    loaded = load_model(model)
    engine = Engine(loaded, num_slots=1)
    # Every request trains (gate none): the record was made before the default gate (issue 26), and a refactor
    # check should run the whole training path on every question rather than answer most of them as direct.
    options = engine.defaults.replace(gate="none")
    for name, index, item in items:
        task = tasks.detect_task(item)
        sampling = SamplingParams(max_tokens=tasks.DEFAULT_MAX_TOKENS[task], temperature=0.0)
        request = Request([{"role": "user", "content": tasks.prompt_for(task, item)}], options, sampling)
        started = time.perf_counter()
        result = engine.run(request)
        yield {"data": name, "index": index, "task": task, "token_ids": result.token_ids, "text": result.text,
               "finish_reason": result.finish_reason, "recon_loss_before": result.trace.recon_loss_before,
               "recon_loss_after": result.trace.recon_loss_after,
               "seconds": round(time.perf_counter() - started, 2)}


def cpu_model() -> str:
    """The processor's name: another processor may round differently, and so may answer differently."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def header(threads: int) -> dict:
    import relat_core

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(relat_core.__file__).parent, text=True,
                            capture_output=True).stdout.strip()
    return {"header": True, "commit": commit, "relat_core": str(Path(relat_core.__file__).parent),
            "threads": threads, "machine": platform.machine(), "cpu": cpu_model(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def compare(recorded: dict, record: dict) -> list[str]:
    """What differs between two answers to one item: nothing, or a line per difference."""
    where = f"{record['data']}#{record['index']}"
    if recorded["token_ids"] == record["token_ids"]:
        return []
    same = 0
    for a, b in zip(recorded["token_ids"], record["token_ids"], strict=False):
        if a != b:
            break
        same += 1
    return [f"{where}: differs after {same} tokens (recorded {len(recorded['token_ids'])}, now "
            f"{len(record['token_ids'])}): {recorded['text'][:60]!r} -> {record['text'][:60]!r}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the record instead of checking against it")
    parser.add_argument("--file", type=Path, default=RECORD,
                        help=f"the record (default {RECORD.relative_to(BENCH.parent)})")
    parser.add_argument("--limit", type=int, help="the first N items of each file only")
    parser.add_argument("--files", nargs="+", choices=FILES, default=FILES, help="which data files (default all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads; check with the record's (default 2)")
    parser.add_argument("--model", help="a model other than the embedded default (its own record, then)")
    parser.add_argument("--answers", type=Path, help="compare this record with --file instead of running the model")
    args = parser.parse_args(argv)

    items = load_items(args.limit, tuple(args.files))
    if args.record:
        args.file.parent.mkdir(parents=True, exist_ok=True)
        with args.file.open("w") as out:
            out.write(json.dumps(header(args.threads)) + "\n")
            for number, record in enumerate(answer_all(items, args.threads, args.model), 1):
                out.write(json.dumps(record) + "\n")
                out.flush()
                print(f"[{number}/{len(items)}] {record['data']}#{record['index']} {len(record['token_ids'])} tokens "
                      f"{record['seconds']} s", file=sys.stderr)
        return 0

    lines = [json.loads(line) for line in args.file.read_text().splitlines() if line.strip()]
    head = lines[0] if lines and lines[0].get("header") else {}
    if head.get("threads") not in (None, args.threads):
        print(f"note: recorded with {head['threads']} threads, checking with {args.threads}", file=sys.stderr)
    if not args.answers and head.get("cpu") not in (None, cpu_model()):
        print(f"note: recorded on {head['cpu']}, checking on {cpu_model()}: rounding may differ", file=sys.stderr)
    recorded = {(r["data"], r["index"]): r for r in lines if not r.get("header")}
    if args.answers:
        answers = [json.loads(line) for line in args.answers.read_text().splitlines() if line.strip()]
        by_item = {(r["data"], r["index"]): r for r in answers if not r.get("header")}
        items = [(name, index, item) for name, index, item in items if (name, index) in by_item]
        new_records = (by_item[(name, index)] for name, index, _ in items)
    missing = [f"{name}#{index}" for name, index, _ in items if (name, index) not in recorded]
    if missing:
        print(f"not in the record: {', '.join(missing)}", file=sys.stderr)
        return 1
    if not args.answers:
        new_records = answer_all(items, args.threads, args.model)
    differences, largest_loss_gap = [], 0.0
    for number, record in enumerate(new_records, 1):
        old = recorded[(record["data"], record["index"])]
        differences += compare(old, record)
        for key in ("recon_loss_before", "recon_loss_after"):
            if old[key] is not None and record[key] is not None:
                largest_loss_gap = max(largest_loss_gap, abs(old[key] - record[key]))
        print(f"[{number}/{len(items)}] {record['data']}#{record['index']} "
              f"{'same' if not compare(old, record) else 'DIFFERS'}", file=sys.stderr)
    for line in differences:
        print(line)
    print(f"{len(items) - len(differences)} of {len(items)} answers identical to the record "
          f"({args.file.name}, {head.get('date', 'undated')}); largest reconstruction-loss difference "
          f"{largest_loss_gap:.2e}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
