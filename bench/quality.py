"""Quality benchmark: accuracy of `direct`, `latent` and `relat` variants on a question/answer JSONL file.

What it measures and why: the engine issue's quality bar is about accuracy, not reconstruction fidelity (a
reconstruction loss near zero went with broken answers, ../shared/notes/relat-notes.md section 3), so each
question x variant records both: whether the greedy reply is correct, and the reconstruction loss before and after
test-time training, with the steps run and the seconds spent. The summary compares every variant with the first
one question by question (wins, losses, exact two-sided sign test), because on 40 questions a difference of two or
three is noise.

Variants are TTT overrides on top of the engine's defaults (`engine.defaults`, relat_core/params.py):

    python bench/quality.py --data ../shared/data/knowledge_dev.jsonl --limit 40 --threads 1 \\
        --variant direct:method=direct --variant latent16:method=latent,latent_steps=16,follow_up=bridge \\
        --variant relat --variant relat-stop1:method=relat,stop_loss=1.0 --out bench/out/knowledge.jsonl

`NAME:key=value,key=value`; values are parsed by the field's type (ints, floats, booleans true/false, `none` for
optional fields, `targets` as `q_proj+v_proj`). A bare `NAME` runs the defaults. Results go to --out, one JSON
line per question x variant, flushed as they come; a rerun skips what is already there (a variant name must
keep its settings), so a long run can be stopped and resumed. The summary is printed and written next to --out
as markdown (`.md`), ready for bench/RESULTS.md.

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
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from scoring import detect_kind, extract_answer_number, gold_text, is_correct  # bench/scoring.py, beside this file

from relat_core import Engine, Request, SamplingParams, TTTParams, load_model

REPO = Path(__file__).resolve().parents[1]
GSM8K_SUFFIX = "Solve it step by step, then give the final answer as a number on the last line."
DEFAULT_MAX_TOKENS = {"knowledge": 32, "gsm8k": 256}


# -- inputs -----------------------------------------------------------------------------------------------------

def resolve_path(path: str) -> Path:
    """Absolute as given; relative from the working directory if it exists there, else from the repository root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO / candidate


def load_items(path: Path, start: int, limit: int | None) -> list[dict]:
    with path.open(encoding="utf-8") as file:
        items = [json.loads(line) for line in file if line.strip()]
    end = None if limit is None else start + limit
    return items[start:end]


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


# -- running ----------------------------------------------------------------------------------------------------

def read_records(out: Path) -> list[dict]:
    if not out.exists():
        return []
    with out.open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def check_compatible(records: list[dict], variants: list[Variant], items: dict[int, dict]) -> None:
    """Refuse to mix results of a variant name run with other settings, or of another data file."""
    specs = {v.name: v.spec for v in variants}
    for record in records:
        name, index = record["variant"], record["index"]
        if name in specs and record["spec"] != specs[name]:
            raise SystemExit(f"{name} in the output file was run as {record['spec']!r}, not {specs[name]!r}: "
                             "use another variant name or another --out")
        if index in items and record["question"] != items[index]["question"]:
            raise SystemExit(f"item {index} in the output file is another question: use another --out")


def run_one(engine, kind: str, item: dict, variant: Variant, max_tokens: int) -> dict:
    ttt = engine.defaults.replace(**variant.overrides)
    request = Request([{"role": "user", "content": prompt_for(kind, item)}], ttt, SamplingParams(max_tokens=max_tokens))
    start = time.perf_counter()
    result = engine.run(request)
    seconds = time.perf_counter() - start
    trace = result.trace.to_dict()
    predicted = extract_answer_number(result.text) if kind == "gsm8k" else None
    return {
        "correct": is_correct(kind, item, result.text), "reply": result.text, "gold": gold_text(kind, item),
        "predicted": None if predicted is None else str(predicted), "finish_reason": result.finish_reason,
        "completion_tokens": result.usage.completion_tokens, "recon_before": trace["recon_loss_before"],
        "recon_after": trace["recon_loss_after"], "steps_run": sum(s["grad_norm"] is not None for s in trace["steps"]),
        "stopped_early": trace["stopped_early"], "aborted": trace["aborted"], "seconds": seconds,
        "timings": trace["timings"],
    }


def run(args: argparse.Namespace, kind: str, items: dict[int, dict], variants: list[Variant]) -> None:
    """Question-major, so that a stopped run still holds paired results for every variant."""
    done = {(r["variant"], r["index"]) for r in read_records(args.out)}
    todo = [(i, v) for i in items for v in variants if (v.name, i) not in done]
    if not todo:
        return
    torch.set_num_threads(args.threads)
    engine = Engine(load_model())
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[kind]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else math.inf
    print(f"{len(todo)} requests to run ({len(done)} already in {args.out}), {args.threads} thread(s)", flush=True)
    with args.out.open("a", encoding="utf-8") as out:
        for count, (index, variant) in enumerate(todo, 1):
            if time.monotonic() > deadline:
                print(f"stopping: --max-minutes {args.max_minutes} reached", flush=True)
                return
            record = {"index": index, "variant": variant.name, "spec": variant.spec, "kind": kind,
                      "question": items[index]["question"], "max_tokens": max_tokens}
            record.update(run_one(engine, kind, items[index], variant, max_tokens))
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            mark = "ok" if record["correct"] else "--"
            print(f"[{count}/{len(todo)}] #{index} {variant.name:<14} {mark} {record['seconds']:5.1f}s "
                  f"{record['reply'][:70]!r}", flush=True)


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


def summary_rows(records: list[dict], names: list[str]) -> list[dict]:
    """One row per variant; wins/losses against names[0] on the questions both have answered."""
    by_variant = {name: {r["index"]: r for r in records if r["variant"] == name} for name in names}
    baseline = by_variant[names[0]] if names else {}
    rows = []
    for name in names:
        results = by_variant[name]
        shared = results.keys() & baseline.keys()
        wins = sum(results[i]["correct"] and not baseline[i]["correct"] for i in shared)
        losses = sum(baseline[i]["correct"] and not results[i]["correct"] for i in shared)
        values = list(results.values())
        rows.append({
            "variant": name, "spec": values[0]["spec"] if values else "", "n": len(values),
            "correct": sum(r["correct"] for r in values),
            "recon_before": _mean([r["recon_before"] for r in values]),
            "recon_after": _mean([r["recon_after"] for r in values]),
            "steps": _mean([r["steps_run"] for r in values]),
            "length": sum(r["finish_reason"] == "length" for r in values),
            "seconds": _mean([r["seconds"] for r in values]),
            "wins": wins, "losses": losses, "p": sign_test(wins, losses),
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)\n"
    base = rows[0]["variant"]
    lines = [f"| variant | overrides | correct | recon before → after | TTT steps | hit max tokens | s/request "
             f"| vs {base}: wins / losses (sign test p) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracy = f"{row['correct']}/{row['n']} ({100 * row['correct'] / row['n']:.0f}%)" if row["n"] else "0/0"
        recon = "–" if row["recon_before"] is None else \
            f"{_fmt(row['recon_before'])} → {_fmt(row['recon_after'])}"
        p = "<0.001" if row["p"] < 0.001 else f"={row['p']:.3f}"
        paired = "–" if row["variant"] == base else f"+{row['wins']} / −{row['losses']} (p{p})"
        lines.append(f"| {row['variant']} | `{row['spec'] or 'defaults'}` | {accuracy} | {recon} | "
                     f"{_fmt(row['steps'], 1)} | {row['length']} | {_fmt(row['seconds'], 1)} | {paired} |")
    return "\n".join(lines) + "\n"


def write_summary(args: argparse.Namespace, kind: str, items: dict[int, dict], names: list[str]) -> str:
    # --also adds other runs' records on the same items, so that variants run at different times can be paired.
    records = [r for path in [args.out, *args.also] for r in read_records(path) if r["index"] in items]
    names = names or list(dict.fromkeys(r["variant"] for r in records))
    table = markdown_table(summary_rows(records, names))
    header = (f"{kind}: {args.data}, items {args.start}–{args.start + len(items) - 1} ({len(items)}), greedy, "
              f"max tokens {args.max_tokens or DEFAULT_MAX_TOKENS[kind]}, engine defaults + overrides, "
              f"{args.threads} thread(s)\n\n")
    text = header + table
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    return text


# -- command line -----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="question/answer JSONL file")
    parser.add_argument("--limit", type=int, default=None, help="number of items (default: all)")
    parser.add_argument("--start", type=int, default=0, help="index of the first item (default 0)")
    parser.add_argument("--kind", choices=("knowledge", "gsm8k"), default=None, help="default: from the fields")
    parser.add_argument("--variant", action="append", default=[], help="NAME[:key=value,...] (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: 32 knowledge, 256 gsm8k")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new request after this long")
    parser.add_argument("--summary-only", action="store_true", help="summarise --out without running anything")
    parser.add_argument("--out", required=True, type=Path, help="results JSONL (appended to, resumable)")
    parser.add_argument("--also", action="append", type=Path, default=[],
                        help="another results JSONL of the same data to include in the summary (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = resolve_path(args.data)
    items = dict(enumerate(load_items(data, args.start, args.limit), args.start))
    if not items:
        raise SystemExit(f"no items in {data} from {args.start}")
    kind = args.kind or detect_kind(next(iter(items.values())))
    try:
        variants = [parse_variant(text) for text in args.variant]
    except ValueError as error:
        raise SystemExit(f"bad --variant: {error}") from error
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("variant names must be unique")
    if not variants and not args.summary_only:
        raise SystemExit("give at least one --variant (or --summary-only)")
    for path in [args.out, *args.also]:
        check_compatible(read_records(path), variants, items)
    if not args.summary_only:
        run(args, kind, items, variants)
    print(write_summary(args, kind, items, [v.name for v in variants]))


if __name__ == "__main__":
    sys.exit(main())
