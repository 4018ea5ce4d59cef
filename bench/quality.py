"""Quality benchmark: accuracy of `direct`, `latent` and `relat` variants on question/answer JSONL files.

What it measures and why: the engine issue's quality bar is about accuracy, not reconstruction fidelity (a
reconstruction loss near zero went with broken answers, ../shared/notes/relat-notes.md section 3), so each
question x variant records both: whether the greedy reply is correct, and the reconstruction loss before and after
test-time training, with the steps run and the seconds spent. The summary compares every variant with two
baselines question by question, `direct` and `latent` (--direct and --latent name them): wins, losses and the
exact two-sided sign test, because on 40 questions a difference of two or three is noise; it also counts the
replies that differ from direct's, since a method can change many answers and few scores.

Variants are TTT overrides on top of the engine's defaults (`engine.defaults`, relat_core/params.py):

    python bench/quality.py --data ../shared/data/knowledge_dev.jsonl --half search --batch 4 --threads 4 \\
        --variant direct:method=direct --variant latent:method=latent \\
        --variant relat --variant relat-stop1:method=relat,stop_loss=1.0 --out bench/out/knowledge.jsonl

`NAME:key=value,key=value`; values are parsed by the field's type (ints, floats, booleans true/false, `none` for
optional fields, `targets` as `q_proj+v_proj`). A bare `NAME` runs the defaults. Results go to --out, one JSON
line per file x question x variant, flushed as they come; a rerun skips what is already there (a variant name
must keep its settings), so a long run can be stopped and resumed. The summary is printed and written next to
--out as markdown (`.md`), ready for bench/RESULTS.md.

Model selection (--half): choosing defaults on the same questions that report them overstates them, so
`--half search` keeps the items at even line indices and `--half confirm` those at odd ones (after --start and
--limit); choose on the search half, then report the confirm half. Parity rather than a cut in the middle,
because the files are ordered (by topic, by difficulty), and each half should sample all of it.

Several files (--data, repeatable): each file's items keep their line index, records name their file in "data",
and results are keyed by (file, variant, index). The summary has a table per file and one over all files pooled,
where pairs are matched on (file, index). Records written before --data could repeat have no "data" field; they
belong to the --data file given, and can only be read with a single one.

Batching (--batch K): K requests at a time through one engine with K adapter slots (continuous batching:
`add_request` / `step`), in the same question-major order, the next admitted as soon as one finishes. The engine
answers each request as it would alone (up to float rounding), so the scores do not depend on K; the seconds do:
a record's `seconds` is its own latency from admission to answer, which overlaps the others', so the summary
also gives each run's wall time per request (the throughput). --batch 1 runs one request at a time.

Prompts and scoring (bench/scoring.py): knowledge questions are sent as they are (one user message, 32 tokens by
default, enough for a one-sentence answer). GSM8K problems get the sentence in GSM8K_SUFFIX appended to the user
message, because the small model otherwise often stops before stating a result; it is the same for every
method, so it is also part of the question that `relat` reconstructs. GSM8K replies get 256 tokens by default.
Decoding is greedy. A relative --data path is tried from the working directory, then from the repository root,
so `--data ../shared/data/...` works from a fresh clone with shared/ beside it; --out is relative to the working
directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
import typing
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from scoring import detect_kind, extract_answer_number, gold_text, is_correct  # bench/scoring.py, beside this file

from relat_core import Engine, EngineBusy, Finished, Request, Result, SamplingParams, TTTParams, load_model
from relat_core.engine import Failed  # not among relat_core's exports

REPO = Path(__file__).resolve().parents[1]
GSM8K_SUFFIX = "Solve it step by step, then give the final answer as a number on the last line."
DEFAULT_MAX_TOKENS = {"knowledge": 32, "gsm8k": 256}
HALVES = {"all": "both halves", "search": "search half (even indices)", "confirm": "confirm half (odd indices)"}

Key = tuple[str, int]  # (data file name, item index): what pairs two variants' records


# -- inputs -----------------------------------------------------------------------------------------------------

def resolve_path(path: str) -> Path:
    """Absolute as given; relative from the working directory if it exists there, else from the repository root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO / candidate


def load_items(path: Path, start: int, limit: int | None) -> dict[int, dict]:
    """The items from line `start` on (at most `limit`), keyed by their index among the file's non-blank lines."""
    with path.open(encoding="utf-8") as file:
        items = [json.loads(line) for line in file if line.strip()]
    end = None if limit is None else start + limit
    return dict(enumerate(items[start:end], start))


def select_half(items: dict[int, dict], half: str) -> dict[int, dict]:
    """`search`: the even indices, `confirm`: the odd ones, `all`: both (module docstring, "Model selection")."""
    if half == "all":
        return items
    parity = 0 if half == "search" else 1
    return {index: item for index, item in items.items() if index % 2 == parity}


@dataclass(frozen=True, eq=False)
class DataSet:
    """One --data file, its items after --start, --limit and --half."""

    name: str  # the file's name: the records' "data"
    source: str  # the path as given, for the summary
    kind: str
    items: dict[int, dict]
    max_tokens: int


def load_datasets(args: argparse.Namespace) -> dict[str, DataSet]:
    datasets: dict[str, DataSet] = {}
    for source in args.data:
        path = resolve_path(source)
        if path.name in datasets:
            raise SystemExit(f"two --data files are named {path.name}: records could not tell them apart")
        items = select_half(load_items(path, args.start, args.limit), args.half)
        if not items:
            raise SystemExit(f"no items in {path} from {args.start} in the {args.half} half")
        kind = args.kind or detect_kind(next(iter(items.values())))
        datasets[path.name] = DataSet(path.name, source, kind, items, args.max_tokens or DEFAULT_MAX_TOKENS[kind])
    return datasets


@dataclass(frozen=True)
class Variant:
    name: str
    spec: str  # the overrides as given, recorded with every result
    overrides: dict[str, object]


def _coerce(key: str, raw: str, hint: object) -> object:
    """Parse one override value by the TTTParams field's type hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null"):
            if type(None) in args:
                return None
            raise ValueError(f"{key} cannot be none")
        return _coerce(key, raw, next(a for a in args if a is not type(None)))
    if hint is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key} wants true or false, got {raw!r}")
    if hint is int:
        return int(raw)
    if hint is float:
        return float(raw)
    if typing.get_origin(hint) is tuple:
        return tuple(part for part in raw.split("+") if part)
    return raw  # str and Literal: TTTParams validates the value


def parse_variant(text: str) -> Variant:
    """`NAME:key=value,...` into a Variant; unknown keys and unparsable values raise ValueError."""
    name, _, spec = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r} has no name")
    hints = typing.get_type_hints(TTTParams)
    known = {f.name for f in fields(TTTParams)}
    overrides: dict[str, object] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"variant {name}: {pair!r} is not key=value with key one of {', '.join(sorted(known))}")
        overrides[key] = _coerce(key, raw.strip(), hints[key])
    return Variant(name, spec, overrides)


def prompt_for(kind: str, item: dict) -> str:
    return item["question"] if kind == "knowledge" else f"{item['question']}\n{GSM8K_SUFFIX}"


# -- records ----------------------------------------------------------------------------------------------------

def read_records(path: Path, default_data: str | None) -> list[dict]:
    """A results file's records. Those without "data" (written before --data could repeat) belong to
    `default_data`, the single --data file; with several files (`None`) they are ambiguous and refused."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as file:
        records = [json.loads(line) for line in file if line.strip()]
    for record in records:
        if "data" not in record:
            if default_data is None:
                raise SystemExit(f"{path} has records without a data file name (an older run): "
                                 "summarise it with its single --data")
            record["data"] = default_data
    return records


def single_name(datasets: dict[str, DataSet]) -> str | None:
    """The file that records without "data" belong to: the only --data file, else none."""
    return next(iter(datasets)) if len(datasets) == 1 else None


def check_compatible(records: list[dict], variants: list[Variant], datasets: dict[str, DataSet]) -> None:
    """Refuse to mix results of a variant name run with other settings, or of another file of the same name."""
    specs = {v.name: v.spec for v in variants}
    for record in records:
        name, index, data = record["variant"], record["index"], datasets.get(record["data"])
        if name in specs and record["spec"] != specs[name]:
            raise SystemExit(f"{name} in the output file was run as {record['spec']!r}, not {specs[name]!r}: "
                             "use another variant name or another --out")
        if data is not None and index in data.items and record["question"] != data.items[index]["question"]:
            raise SystemExit(f"item {index} of {data.name} in the output file is another question: "
                             "use another --out")


@dataclass(frozen=True, eq=False)
class Job:
    """One request of the benchmark: a variant on an item of a file."""

    data: DataSet
    index: int
    variant: Variant

    @property
    def item(self) -> dict:
        return self.data.items[self.index]

    @property
    def request_id(self) -> str:
        return f"{self.data.name}#{self.index}:{self.variant.name}"


def make_record(job: Job, result: Result, seconds: float, batch: int, run_id: str, run_s: float) -> dict:
    """The JSON line of a finished request. `seconds` is its latency from admission to answer; `batch`, `run` and
    `run_s` (seconds from the run's first admission to this answer) let the summary tell latency from throughput."""
    kind, item, trace = job.data.kind, job.item, result.trace
    predicted = extract_answer_number(result.text) if kind == "gsm8k" else None
    return {
        "data": job.data.name, "index": job.index, "variant": job.variant.name, "spec": job.variant.spec,
        "kind": kind, "question": item["question"], "max_tokens": job.data.max_tokens,
        "correct": is_correct(kind, item, result.text), "reply": result.text, "gold": gold_text(kind, item),
        "predicted": None if predicted is None else str(predicted), "finish_reason": result.finish_reason,
        "completion_tokens": result.usage.completion_tokens, "recon_before": trace.recon_loss_before,
        "recon_after": trace.recon_loss_after, "steps_run": sum(s["grad_norm"] is not None for s in trace.steps),
        "stopped_early": trace.stopped_early, "aborted": trace.aborted, "seconds": seconds,
        "timings": trace.timings, "batch": batch, "run": run_id, "run_s": run_s,
    }


# -- running ----------------------------------------------------------------------------------------------------

def make_request(engine: Engine, job: Job) -> Request:
    ttt = engine.defaults.replace(**job.variant.overrides)
    return Request([{"role": "user", "content": prompt_for(job.data.kind, job.item)}], ttt,
                   SamplingParams(max_tokens=job.data.max_tokens))


def run(args: argparse.Namespace, datasets: dict[str, DataSet], variants: list[Variant]) -> None:
    """Run what --out lacks, --batch requests at a time. Question-major, so that a stopped run still holds paired
    results for every variant; records are written as requests finish, so a stopped run loses only those in flight.
    --batch 1 takes the same path: one request in the engine at a time is what `Engine.run` does."""
    done = {(r["data"], r["variant"], r["index"]) for r in read_records(args.out, single_name(datasets))}
    todo = deque(Job(data, index, variant) for data in datasets.values() for index in data.items
                 for variant in variants if (data.name, variant.name, index) not in done)
    if not todo:
        return
    total = len(todo)
    torch.set_num_threads(args.threads)
    engine = Engine(load_model(), num_slots=args.batch)  # a slot per request in flight: relat never waits for one
    args.out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else math.inf
    print(f"{total} requests to run ({len(done)} already in {args.out}), batch {args.batch}, "
          f"{args.threads} thread(s)", flush=True)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    in_flight: dict[str, tuple[Job, float]] = {}  # request id -> (job, admission time)
    finished = 0
    run_start = time.perf_counter()
    with args.out.open("a", encoding="utf-8") as out:
        while todo or in_flight:
            if todo and time.monotonic() > deadline:
                print(f"stopping: --max-minutes {args.max_minutes} reached, finishing the {len(in_flight)} "
                      "in flight", flush=True)
                todo.clear()
            while todo and len(in_flight) < args.batch:
                job = todo[0]
                try:
                    engine.add_request(job.request_id, make_request(engine, job))
                except EngineBusy:
                    if not in_flight:  # nothing will free a slot: waiting would never end
                        raise
                    break  # every slot is leased: admit it when a request finishes
                todo.popleft()
                in_flight[job.request_id] = (job, time.perf_counter())
            for request_id, event in engine.step():
                if isinstance(event, Failed):  # a benchmark that skipped failures would score what remains
                    raise SystemExit(f"{request_id} failed: {event.error!r}") from event.error
                if not isinstance(event, Finished):
                    continue
                job, admitted = in_flight.pop(request_id)
                now = time.perf_counter()
                record = make_record(job, event.result, now - admitted, args.batch, run_id, now - run_start)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                finished += 1
                mark = "ok" if record["correct"] else "--"
                print(f"[{finished}/{total}] {job.data.name}#{job.index} {job.variant.name:<14} {mark} "
                      f"{record['seconds']:5.1f}s {record['reply'][:70]!r}", flush=True)


# -- summary ----------------------------------------------------------------------------------------------------

def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test on the discordant pairs (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class Paired:
    """A variant against a baseline on the items both have answered."""

    shared: int
    wins: int  # right where the baseline is wrong
    losses: int  # wrong where the baseline is right
    differ: int  # replies other than the baseline's (whitespace at the ends aside)

    @property
    def p(self) -> float:
        return sign_test(self.wins, self.losses)


def by_key(records: list[dict], variant: str) -> dict[Key, dict]:
    return {(r["data"], r["index"]): r for r in records if r["variant"] == variant}


def pair(results: dict[Key, dict], baseline: dict[Key, dict]) -> Paired:
    shared = results.keys() & baseline.keys()
    return Paired(len(shared),
                  sum(results[k]["correct"] and not baseline[k]["correct"] for k in shared),
                  sum(baseline[k]["correct"] and not results[k]["correct"] for k in shared),
                  sum(results[k]["reply"].strip() != baseline[k]["reply"].strip() for k in shared))


def summary_rows(records: list[dict], names: list[str], direct: str, latent: str) -> list[dict]:
    """One row per variant, paired with the `direct` and `latent` baselines; a baseline is looked up in all the
    records, named or not, and a row has no pairing (None) against itself or a baseline that has no records."""
    baselines = {column: (baseline, by_key(records, baseline))
                 for column, baseline in (("vs_direct", direct), ("vs_latent", latent))}
    rows = []
    for name in names:
        results = by_key(records, name)
        values = list(results.values())
        row = {
            "variant": name, "spec": values[0]["spec"] if values else "", "n": len(values),
            "correct": sum(r["correct"] for r in values),
            "recon_before": _mean([r["recon_before"] for r in values]),
            "recon_after": _mean([r["recon_after"] for r in values]),
            "steps": _mean([r["steps_run"] for r in values]),
            "length": sum(r["finish_reason"] == "length" for r in values),
            "seconds": _mean([r["seconds"] for r in values]),
            "tokens": _mean([r.get("completion_tokens") for r in values]),  # generated, agents' text included
            # Records before --batch ran one request at a time.
            "batches": sorted({r.get("batch", 1) for r in values}),
        }
        for column, (baseline, base) in baselines.items():
            row[column] = None if name == baseline or not base else pair(results, base)
        rows.append(row)
    return rows


def _paired_cell(paired: Paired | None) -> str:
    if paired is None:
        return "–"
    p = "<0.001" if paired.p < 0.001 else f"={paired.p:.3f}"
    return f"+{paired.wins} / −{paired.losses} (p{p})"


def markdown_table(rows: list[dict], direct: str, latent: str) -> str:
    if not rows:
        return "(no results)\n"
    lines = [f"| variant | overrides | correct | vs {direct}: wins / losses (sign test p) "
             f"| vs {latent}: wins / losses (sign test p) | replies ≠ {direct} | recon before → after | TTT steps "
             "| hit max tokens | tokens generated/request | s/request |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracy = f"{row['correct']}/{row['n']} ({100 * row['correct'] / row['n']:.0f}%)" if row["n"] else "0/0"
        recon = "–" if row["recon_before"] is None else \
            f"{_fmt(row['recon_before'])} → {_fmt(row['recon_after'])}"
        vs_direct = row["vs_direct"]
        differ = "–" if vs_direct is None else f"{vs_direct.differ}/{vs_direct.shared}"
        # Latency of one request; with batch > 1 requests overlap, and the run lines give the throughput.
        batches = "" if row["batches"] in ([], [1]) else f" (batch {'/'.join(map(str, row['batches']))})"
        lines.append(f"| {row['variant']} | `{row['spec'] or 'defaults'}` | {accuracy} | "
                     f"{_paired_cell(vs_direct)} | {_paired_cell(row['vs_latent'])} | {differ} | {recon} | "
                     f"{_fmt(row['steps'], 1)} | {row['length']} | {_fmt(row['tokens'], 0)} | "
                     f"{_fmt(row['seconds'], 1)}{batches} |")
    return "\n".join(lines) + "\n"


def run_lines(records: list[dict], shown: list[dict]) -> list[str]:
    """The throughput of each run that wrote records of the tables (`shown`), over all of that run's records: its
    wall time from the first admission to the last answer, per request. Older records have no run."""
    runs: dict[str, list[dict]] = {}
    for record in records:
        if "run" in record:
            runs.setdefault(record["run"], []).append(record)
    lines = []
    for run_id in dict.fromkeys(r["run"] for r in shown if "run" in r):
        members = runs[run_id]
        wall = max(r["run_s"] for r in members)
        batch = "/".join(map(str, sorted({r["batch"] for r in members})))
        lines.append(f"- run {run_id}: {len(members)} requests, batch {batch}, {wall:.1f} s wall from the first "
                     f"admission to the last answer: {wall / len(members):.2f} s per request\n")
    return lines


def table_header(description: str, max_tokens: str, args: argparse.Namespace) -> str:
    return (f"{description}, {HALVES[args.half]}, greedy, max tokens {max_tokens}, engine defaults + overrides, "
            f"{args.threads} thread(s)\n\n")


def write_summary(args: argparse.Namespace, datasets: dict[str, DataSet], names: list[str]) -> str:
    # --also adds other runs' records on the same items, so that variants run at different times can be paired.
    every = [r for path in [args.out, *args.also] for r in read_records(path, single_name(datasets))]
    records = [r for r in every if r["data"] in datasets and r["index"] in datasets[r["data"]].items]
    names = names or list(dict.fromkeys(r["variant"] for r in records))

    def table(subset: list[dict]) -> str:
        return markdown_table(summary_rows(subset, names, args.direct, args.latent), args.direct, args.latent)

    parts = []
    for data in datasets.values():
        description = f"{data.kind}: {data.source}, items {min(data.items)}–{max(data.items)} ({len(data.items)})"
        parts.append(table_header(description, str(data.max_tokens), args)
                     + table([r for r in records if r["data"] == data.name]))
    if len(datasets) > 1:
        kinds = "/".join(dict.fromkeys(data.kind for data in datasets.values()))
        sizes = " + ".join(str(len(data.items)) for data in datasets.values())
        description = f"{kinds}: all {len(datasets)} files pooled ({sizes} items, pairs matched on file and index)"
        tokens = "/".join(dict.fromkeys(str(data.max_tokens) for data in datasets.values()))
        parts.append(table_header(description, tokens, args) + table(records))
    throughput = run_lines(every, records)
    if throughput:
        parts.append("Throughput (s/request above is each request's own latency, which overlaps others' "
                     "when batch > 1):\n\n" + "".join(throughput))
    text = "\n".join(parts)
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    return text


# -- command line -----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, action="append",
                        help="question/answer JSONL file (repeatable: a table per file and one pooled)")
    parser.add_argument("--limit", type=int, default=None, help="number of items of each file (default: all)")
    parser.add_argument("--start", type=int, default=0, help="index of the first item (default 0)")
    parser.add_argument("--half", choices=tuple(HALVES), default="all",
                        help="search: even indices, confirm: odd indices (after --start/--limit; default all)")
    parser.add_argument("--kind", choices=("knowledge", "gsm8k"), default=None, help="default: from the fields")
    parser.add_argument("--variant", action="append", default=[], help="NAME[:key=value,...] (repeatable)")
    parser.add_argument("--direct", default="direct", help="the variant of the first baseline (default direct)")
    parser.add_argument("--latent", default="latent", help="the variant of the second baseline (default latent)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: 32 knowledge, 256 gsm8k")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="requests run together in one engine (default 1)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="admit no new request after this long (those in flight finish)")
    parser.add_argument("--summary-only", action="store_true", help="summarise --out without running anything")
    parser.add_argument("--out", required=True, type=Path, help="results JSONL (appended to, resumable)")
    parser.add_argument("--also", action="append", type=Path, default=[],
                        help="another results JSONL of the same data to include in the summary (repeatable)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    datasets = load_datasets(args)
    try:
        variants = [parse_variant(text) for text in args.variant]
    except ValueError as error:
        raise SystemExit(f"bad --variant: {error}") from error
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("variant names must be unique")
    if not variants and not args.summary_only:
        raise SystemExit("give at least one --variant (or --summary-only)")
    for path in [args.out, *args.also]:
        check_compatible(read_records(path, single_name(datasets)), variants, datasets)
    if not args.summary_only:
        run(args, datasets, variants)
    print(write_summary(args, datasets, [v.name for v in variants]))


if __name__ == "__main__":
    sys.exit(main())
