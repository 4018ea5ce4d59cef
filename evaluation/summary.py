"""The numbers of a `relat eval` report (relat_eval.report, relat_eval.plots): each variant's row over a group
of records (a task, or every task pooled), with its 95% Wilson interval and its paired sign test against the
baseline (relat_eval.stats); the sweeps among the variants' options; the mean seconds per phase; the Pareto front
of accuracy against mean seconds per request (the variants no other beats on both, as in the cost-accuracy
frontiers of Kapoor et al., "AI Agents That Matter", arXiv:2407.01502); and the few texts that both the tables
and the plots print.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from relat_eval.stats import Item, Paired, by_item, mean, pair, wilson_interval
from relat_eval.tasks import TASKS

POOLED = "all"  # the group of every task together
PHASES = ("train_s", "think_s", "decode_s")  # the rest of total_s is drawn as "other"

Record = dict[str, Any]


# -- numbers ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One variant's numbers over one group of records (a task, or all of them)."""

    variant: str
    n: int
    correct: int
    paired: Paired | None  # None for the baseline itself, or where the baseline has no records
    recon_before: float | None  # means over the records that have both losses
    recon_after: float | None
    steps: float | None
    length: int  # replies cut off at max tokens
    tokens: float | None
    seconds: float | None
    errors: int
    p95_seconds: float | None = None
    # A gated variant: the requests its gate trained (None where no gate ran).
    trained: int | None = None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None


def make_row(variant: str, results: dict[Item, Record], baseline: dict[Item, Record] | None) -> Row:
    """`baseline` is None when there is nothing to pair with (the variant is the baseline, or it has no records)."""
    values = list(results.values())
    recon = [r for r in values if r.get("recon_before") is not None and r.get("recon_after") is not None]
    return Row(
        variant=variant, n=len(values), correct=sum(bool(r.get("correct")) for r in values),
        paired=None if baseline is None else pair(results, baseline),
        recon_before=mean(r["recon_before"] for r in recon), recon_after=mean(r["recon_after"] for r in recon),
        steps=mean(r.get("steps_run") for r in values),
        length=sum(r.get("finish_reason") == "length" for r in values),
        tokens=mean(r.get("completion_tokens") for r in values),
        seconds=mean(r.get("seconds") for r in values),
        errors=sum(r.get("error") is not None for r in values),
        p95_seconds=percentile([r["seconds"] for r in values if r.get("seconds") is not None], 95),
        trained=sum(r.get("gated") is False for r in values) if any(r.get("gated") is not None for r in values)
        else None,
    )


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, linearly interpolated between order statistics (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def group_records(records: list[Record]) -> dict[str, list[Record]]:
    """The records by task, in the order of relat_eval.tasks.TASKS (others after, as they come), and all of them
    pooled when there are several tasks (one task pooled would repeat its table)."""
    tasks = sorted(dict.fromkeys(task_of(r) for r in records),
                   key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS)))
    groups = {task: [r for r in records if task_of(r) == task] for task in tasks}
    if len(groups) > 1:
        groups[POOLED] = records
    return groups


def task_of(record: Record) -> str:
    return record.get("task") or "unknown"


def group_rows(records: list[Record], names: list[str], baseline: str) -> dict[str, Row]:
    """Every named variant's row over `records`; the baseline is looked up among all of them, named or not."""
    base = by_item(records, baseline) or None
    return {name: make_row(name, by_item(records, name), None if name == baseline else base) for name in names}


# -- sweeps -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sweep:
    """Variants whose options differ in the numeric option `key` alone."""

    key: str
    fixed: dict[str, Any]  # the options they share
    points: list[tuple[float, str]]  # (value of key, variant), by value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):  # a bool is an int to Python, but a switch is no sweep
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def find_sweeps(options: dict[str, dict[str, Any]]) -> list[Sweep]:
    """The sweeps among variants' options (name -> options as given): for each numeric option, the variants that
    set it and agree on every other option, when they set it to two values or more. A variant that leaves the
    option out runs the server's default, whose value the options do not say, so it is in no sweep of it."""
    sweeps = []
    keys = sorted({key for opts in options.values() for key, value in opts.items() if _number(value) is not None})
    for key in keys:
        groups: dict[str, tuple[dict[str, Any], list[tuple[float, str]]]] = {}
        for name, opts in options.items():
            value = _number(opts.get(key))
            if value is None:
                continue
            rest = {k: v for k, v in opts.items() if k != key}
            signature = json.dumps(rest, sort_keys=True, default=str)
            groups.setdefault(signature, (rest, []))[1].append((value, name))
        for rest, points in groups.values():
            if len({value for value, _ in points}) >= 2:
                sweeps.append(Sweep(key, rest, sorted(points)))
    return sweeps


# -- phases -----------------------------------------------------------------------------------------------------

def phase_means(records: list[Record], name: str) -> dict[str, float]:
    """Mean seconds per phase of a variant's records that have timings, and "other": what total_s has beyond
    the phases (prefill, scheduling, waiting for a batch slot)."""
    timings = [r["timings"] for r in records if r["variant"] == name and isinstance(r.get("timings"), dict)]
    means = {key: mean(t.get(key) for t in timings) for key in (*PHASES, "total_s")}
    found = {key: value for key, value in means.items() if value is not None}
    if "total_s" in found:
        found["other"] = max(0.0, found["total_s"] - sum(found.get(phase, 0.0) for phase in PHASES))
    return found


# -- cost -------------------------------------------------------------------------------------------------------

def cost_points(rows: Iterable[Row]) -> dict[str, tuple[float, float]]:
    """Each variant's (mean seconds per request, accuracy), for the rows that have both."""
    return {row.variant: (row.seconds, row.accuracy) for row in rows
            if row.accuracy is not None and row.seconds is not None}


def pareto_front(rows: Iterable[Row]) -> list[str]:
    """The variants on the Pareto front of accuracy against mean seconds, cheapest first: those no other variant
    dominates (accuracy as high or higher AND seconds as low or lower, strictly better in one). Variants tied on
    both dominate neither and are both on it; a row without records or seconds is on no front."""
    points = cost_points(rows)

    def dominated(seconds: float, accuracy: float) -> bool:
        return any(other_s <= seconds and other_a >= accuracy and (other_s, other_a) != (seconds, accuracy)
                   for other_s, other_a in points.values())

    front = [name for name, point in points.items() if not dominated(*point)]
    return sorted(front, key=lambda name: points[name][0])  # stable: ties keep the variants' order


def pareto_line(rows: Iterable[Row]) -> str:
    front = pareto_front(rows)
    if not front:
        return "Pareto front (accuracy against mean seconds): none (no variant has seconds recorded)\n"
    return f"Pareto front (accuracy against mean seconds): {', '.join(front)}\n"


# -- text the tables and the plots share ------------------------------------------------------------------------

def as_text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={as_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(as_text(v) for v in value)
    return str(value)


def p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"
