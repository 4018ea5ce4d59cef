"""The report of a `relat eval` folder: `report.md` and its plots, from `records.jsonl` and `run.json`
(relat_eval.records), rewritten whole after every run so that it always describes every record there.

What it shows and why:
- an accuracy table per task and one over all tasks pooled (pairs matched on data file and index). Each accuracy
  comes with its 95% Wilson interval, and each variant with its wins and losses against a baseline (`direct` by
  default) and the exact sign test, because on a few dozen items a difference of two or three is noise
  (relat_eval.stats); the replies that differ from the baseline's, since a method can change many replies and few
  scores; relat's reconstruction loss before and after training, which is no measure of quality (a loss near zero
  went with broken answers, ../shared/notes/relat-notes.md section 3) but tells whether training ran as meant; the
  replies cut off at max tokens, which score as wrong for reasons that are not the method's; and the failed
  requests, which score as wrong too.
- the seconds per phase (training, latent thinking, decoding). With batching they are latencies under load, so
  each run's wall time per item, its throughput, comes with them.
- sweeps: variants whose options differ in one numeric option alone (relat-l1 and relat-l4 with latent_steps 1 and
  4) get accuracy against that option, a table and a plot each.

Plots are drawn on `matplotlib.figure.Figure` objects, never through pyplot: no display is needed, no backend is
chosen for the caller, and a figure is freed with its last reference. Without matplotlib (the `eval` extra) the
report is written without them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relat_eval.records import read_records, read_runs
from relat_eval.stats import Item, Paired, by_item, mean, pair, wilson_interval
from relat_eval.tasks import TASKS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT = "report.md"
POOLED = "all"  # the group of every task together
PHASES = ("train_s", "think_s", "decode_s")  # the rest of total_s is drawn as "other"
PLOTS = ("accuracy.png", "paired.png", "reconstruction.png", "seconds.png", "tokens.png")  # sweeps add sweep-*.png
RUN_FIELDS = ("model", "machine", "date", "target")  # what the header names for every run of run.json

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
    )


def group_records(records: list[Record]) -> dict[str, list[Record]]:
    """The records by task, in the order of relat_eval.tasks.TASKS (others after, as they come), and all of them
    pooled when there are several tasks (one task pooled would repeat its table)."""
    tasks = sorted(dict.fromkeys(_task(r) for r in records),
                   key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS)))
    groups = {task: [r for r in records if _task(r) == task] for task in tasks}
    if len(groups) > 1:
        groups[POOLED] = records
    return groups


def _task(record: Record) -> str:
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


# -- run.json ---------------------------------------------------------------------------------------------------

def run_variants(run: dict[str, Any]) -> dict[str, Any]:
    """A run's variants, name -> full options. run.json (relat_eval.cli) writes {name: {"given": ..., "options":
    ...}}; plain {name: options} and [{"name": ..., "options": ...}] are read too."""
    variants = run.get("variants") or {}
    if isinstance(variants, dict):
        return {name: entry["options"] if isinstance(entry, dict) and "options" in entry else entry
                for name, entry in variants.items()}
    found: dict[str, Any] = {}
    for entry in variants:
        if isinstance(entry, dict) and "name" in entry:
            found[entry["name"]] = entry.get("options", {k: v for k, v in entry.items() if k != "name"})
    return found


def _target(run: dict[str, Any]) -> str | None:
    target = run.get("target") or run.get("url") or run.get("base_url")
    return None if target is None else _text(target)


def _run_value(run: dict[str, Any], field: str) -> str | None:
    if field == "target":
        return _target(run)
    if field == "date":
        value = run.get("date") or run.get("started") or run.get("run")
    else:
        value = run.get(field)
    return None if value is None else _text(value)


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _code(text: str) -> str:
    """Markdown inline code that survives a backtick or a table's bar in the text."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`" if text else "–"


# -- markdown ---------------------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _accuracy_cell(row: Row) -> str:
    return f"{row.correct}/{row.n} ({100 * row.correct / row.n:.0f}%)" if row.n else "0/0"


def _interval_cell(row: Row) -> str:
    low, high = row.interval
    return f"{100 * low:.0f}–{100 * high:.0f}%" if row.n else "–"


def accuracy_table(rows: Iterable[Row], baseline: str, paired: bool) -> str:
    """The markdown table of one group; `paired` says whether the baseline has records there."""
    head = ["variant", "correct", "95% CI"]
    if paired:
        head += [f"vs {baseline}: wins / losses (sign test)", f"replies ≠ {baseline}"]
    head += ["recon before → after", "steps run", "hit max tokens", "tokens generated", "s/item", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.variant, _accuracy_cell(row), _interval_cell(row)]
        if paired:
            if row.paired is None:
                cells += ["(baseline)", "–"]
            elif not row.n:
                cells += ["–", "–"]
            else:
                cells += [f"+{row.paired.wins} / −{row.paired.losses} ({_p_text(row.paired.p)})",
                          f"{row.paired.differ}/{row.paired.shared}"]
        recon = "–" if row.recon_before is None else f"{_fmt(row.recon_before)} → {_fmt(row.recon_after)}"
        cells += [recon, _fmt(row.steps, 1), str(row.length), _fmt(row.tokens, 0), _fmt(row.seconds, 1),
                  str(row.errors)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def header(records: list[Record], runs: list[dict[str, Any]], names: list[str]) -> list[str]:
    """The title, what ran where and when (run.json), and every variant's full options."""
    parts = ["# Evaluation report\n"]
    if runs:
        summary = []
        for field in RUN_FIELDS:
            values = list(dict.fromkeys(v for v in (_run_value(run, field) for run in runs) if v is not None))
            label = field + ("s" if len(values) > 1 else "")
            summary.append(f"- {label}: " + (", ".join(values) if values else "not recorded"))
        parts.append("\n".join(summary) + "\n")
        lines = []
        for run in runs:
            # Whatever else the run recorded (records, wall time, commit, data...), so that nothing it wrote is
            # hidden; the fields above and the variants (the table below) are not repeated.
            extra = [f"{key} {_text(value)}" for key, value in run.items()
                     if key not in (*RUN_FIELDS, "variants", "url", "base_url", "started", "run")
                     and value is not None]
            lines.append(f"- run {run.get('run', '?')}: " + "; ".join(extra))
        parts.append(f"Runs ({len(runs)}):\n\n" + "\n".join(lines) + "\n")
    else:
        parts.append("No run.json: the model, machine, date and target are not recorded.\n")
    if names:
        parts.append(options_table(records, runs, names))
    return parts


def options_table(records: list[Record], runs: list[dict[str, Any]], names: list[str]) -> str:
    """Every option of every variant, one row per option: the full options of run.json (the last run that named
    the variant), in bold where the variant set them; without run.json, the options its records give."""
    full: dict[str, dict[str, Any]] = {}
    for name in names:
        found = next((run_variants(run)[name] for run in reversed(runs) if name in run_variants(run)), None)
        given = next((r.get("options") for r in records if r["variant"] == name and r.get("options")), None) or {}
        full[name] = {key: (value, key in given) for key, value in (found or given).items()}
    keys = list(dict.fromkeys(key for options in full.values() for key in options))
    lines = ["| option | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        cells = []
        for name in names:
            if key not in full[name]:
                cells.append("–")
                continue
            value, given = full[name][key]
            text = _text(value).replace("|", "\\|") or "''"
            cells.append(f"**{text}**" if given else text)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("| records | " + " | ".join(str(sum(r["variant"] == n for r in records)) for n in names) + " |")
    return ("Variants: every option each ran with (bold: set by the variant; the rest are the engine's or the "
            "server's defaults).\n\n" + "\n".join(lines) + "\n")


def group_title(group: str, records: list[Record]) -> str:
    files = ", ".join(_code(data) for data in dict.fromkeys(r["data"] for r in records))
    items = len({(r["data"], r["index"]) for r in records})
    if group == POOLED:
        return f"### All tasks pooled ({items} items; pairs matched on data file and index)\n"
    return f"### {group} ({files}; {items} items)\n"


def per_file_table(records: list[Record], names: list[str]) -> str:
    """Correct answers per data file and variant, when a task pools several files (empty otherwise)."""
    files = list(dict.fromkeys(r["data"] for r in records))
    if len(files) < 2:
        return ""
    lines = ["| file | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for data in files:
        cells = []
        for name in names:
            mine = [r for r in records if r["data"] == data and r["variant"] == name]
            correct = sum(bool(r.get("correct")) for r in mine)
            cells.append(f"{correct}/{len(mine)}" if mine else "–")
        lines.append(f"| {_code(data)} | " + " | ".join(cells) + " |")
    return "Per file:\n\n" + "\n".join(lines) + "\n"


def phase_table(records: list[Record], names: list[str]) -> str:
    head = ["variant", *PHASES, "other", "total_s", "latency (seconds)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        phases = phase_means(records, name)
        mine = [r for r in records if r["variant"] == name]
        cells = [_fmt(phases.get(phase)) for phase in (*PHASES, "other", "total_s")]
        lines.append("| " + " | ".join([name, *cells, _fmt(mean(r.get("seconds") for r in mine))]) + " |")
    return "\n".join(lines) + "\n"


def phase_means(records: list[Record], name: str) -> dict[str, float]:
    """Mean seconds per phase of a variant's records that have timings, and "other": what total_s has beyond
    the phases (prefill, scheduling, waiting for a batch slot)."""
    timings = [r["timings"] for r in records if r["variant"] == name and isinstance(r.get("timings"), dict)]
    means = {key: mean(t.get(key) for t in timings) for key in (*PHASES, "total_s")}
    found = {key: value for key, value in means.items() if value is not None}
    if "total_s" in found:
        found["other"] = max(0.0, found["total_s"] - sum(found.get(phase, 0.0) for phase in PHASES))
    return found


def throughput_lines(records: list[Record], shown: set[Any]) -> list[str]:
    """Each run's (of those in `shown`) wall time from its start to its last answer, per item answered: what
    batching buys, which the latencies above, overlapping each other, do not show."""
    runs: dict[str, list[Record]] = {}
    for record in records:
        if record.get("run") in shown and record.get("run") is not None and record.get("run_s") is not None:
            runs.setdefault(str(record["run"]), []).append(record)
    lines = []
    for run_id, members in runs.items():
        wall = max(r["run_s"] for r in members)
        lines.append(f"- run {run_id}: {len(members)} requests in {wall:.1f} s wall: {wall / len(members):.2f} s "
                     "per request\n")
    return lines


def sweep_table(sweep: Sweep, groups: dict[str, dict[str, Row]]) -> str:
    head = [sweep.key, "variant", *groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for value, name in sweep.points:
        cells = [f"{value:g}", name]
        for rows in groups.values():
            row = rows.get(name)
            cells.append(f"{_accuracy_cell(row)} [{_interval_cell(row)}]" if row and row.n else "–")
        lines.append("| " + " | ".join(cells) + " |")
    fixed = _code(_text(sweep.fixed)) if sweep.fixed else "no other option"
    return f"Sweep over `{sweep.key}` ({fixed} fixed), accuracy [95% CI]:\n\n" + "\n".join(lines) + "\n"


# -- plots ------------------------------------------------------------------------------------------------------

def _figure(width: float, height: float) -> Figure | None:
    """A new figure, or None without matplotlib. Constrained layout, because variant names are as long as their
    authors make them and must not be cut off."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Figure, path: Path) -> str:
    figure.savefig(path, dpi=100)
    return path.name


def _colour(names: list[str], name: str) -> str:
    return f"C{names.index(name) % 10}"  # one colour per variant across every plot


def plot_accuracy(path: Path, groups: dict[str, dict[str, Row]], names: list[str]) -> str | None:
    figure = _figure(max(6.0, 1.0 + 0.35 * len(names) * len(groups)), 4.0)
    if figure is None:
        return None
    axes = figure.add_subplot()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, heights, below, above = [], [], [], []
        for g, rows in enumerate(groups.values()):
            row = rows[name]
            if not row.n:
                continue
            low, high = row.interval
            xs.append(g - 0.4 + width * (i + 0.5))
            heights.append(100 * row.accuracy)
            below.append(100 * (row.accuracy - low))
            above.append(100 * (high - row.accuracy))
        if xs:
            axes.bar(xs, heights, width, yerr=[below, above], capsize=3, color=_colour(names, name), label=name)
    labels = [f"{group}\n({max(row.n for row in rows.values())} items)" for group, rows in groups.items()]
    axes.set_xticks(range(len(groups)), labels=labels)
    axes.set_ylim(0, 100)
    axes.set_ylabel("accuracy (%), 95% Wilson interval")
    if axes.get_legend_handles_labels()[0]:  # some variant has records
        figure.legend(loc="outside upper center", fontsize="small", ncols=min(len(names), 6))  # off the bars
    return _save(figure, path)


def plot_paired(path: Path, groups: dict[str, dict[str, Row]], baseline: str) -> str | None:
    shown = {group: [row for row in rows.values() if row.paired is not None and row.paired.shared]
             for group, rows in groups.items()}
    shown = {group: rows for group, rows in shown.items() if rows}
    if not shown:
        return None
    height = 1.0 + sum(0.35 * len(rows) + 0.6 for rows in shown.values())
    figure = _figure(7.0, height)
    if figure is None:
        return None
    from matplotlib.ticker import MaxNLocator  # matplotlib is there: _figure found it

    panels = figure.subplots(len(shown), 1, squeeze=False)[:, 0]
    for axes, (group, rows) in zip(panels, shown.items(), strict=True):
        ys = range(len(rows))
        axes.barh(ys, [row.paired.wins for row in rows], color="tab:green", label="wins")
        axes.barh(ys, [-row.paired.losses for row in rows], color="tab:red", label="losses")
        for y, row in zip(ys, rows, strict=True):
            axes.text(row.paired.wins, y, f" +{row.paired.wins}", va="center", fontsize="small")
            axes.text(-row.paired.losses, y, f"−{row.paired.losses} ", va="center", ha="right", fontsize="small")
        axes.set_yticks(list(ys), labels=[f"{row.variant} ({_p_text(row.paired.p)})" for row in rows])
        axes.axvline(0, color="black", linewidth=0.8)
        reach = max(max(row.paired.wins, row.paired.losses) for row in rows) or 1
        axes.set_xlim(-1.25 * reach, 1.25 * reach)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of items
        axes.invert_yaxis()
        axes.set_title(f"{group}: against {baseline}, items where exactly one is right", fontsize="medium")
    panels[-1].set_xlabel(f"← losses (only {baseline} right)   wins (only the variant right) →")
    panels[0].legend(fontsize="small", loc="lower right")
    return _save(figure, path)


def plot_reconstruction(path: Path, records: list[Record], names: list[str]) -> str | None:
    data = {}
    for name in names:
        mine = [r for r in records if r["variant"] == name]
        before = [r["recon_before"] for r in mine if r.get("recon_before") is not None]
        after = [r["recon_after"] for r in mine if r.get("recon_after") is not None]
        if before or after:
            data[name] = (before, after)
    if not data:
        return None
    figure = _figure(max(5.0, 1.0 + 1.2 * len(data)), 4.0)
    if figure is None:
        return None
    from matplotlib.patches import Patch  # matplotlib is there: _figure found it

    axes = figure.add_subplot()
    for i, (name, (before, after)) in enumerate(data.items()):
        for offset, values, shade in ((-0.2, before, "lightgrey"), (0.2, after, _colour(names, name))):
            if values:
                boxes = axes.boxplot([values], positions=[i + offset], widths=0.35, patch_artist=True,
                                     medianprops={"color": "black"})
                boxes["boxes"][0].set_facecolor(shade)
    axes.set_xticks(range(len(data)), labels=list(data))
    axes.set_ylabel("reconstruction loss per item")
    axes.legend(handles=[Patch(facecolor="lightgrey", edgecolor="black", label="before training (left)"),
                         Patch(facecolor="white", edgecolor="black", label="after (right, the variant's colour)")],
                fontsize="small")
    return _save(figure, path)


def plot_seconds(path: Path, records: list[Record], names: list[str]) -> str | None:
    means = {name: phase_means(records, name) for name in names}
    means = {name: phases for name, phases in means.items() if phases}
    if not means:
        return None
    figure = _figure(max(5.0, 1.0 + 0.8 * len(means)), 4.0)
    if figure is None:
        return None
    axes = figure.add_subplot()
    bottom = [0.0] * len(means)
    for phase, colour in zip((*PHASES, "other"), ("tab:orange", "tab:purple", "tab:blue", "lightgrey"), strict=True):
        heights = [phases.get(phase, 0.0) for phases in means.values()]
        axes.bar(list(means), heights, bottom=bottom, color=colour, label=phase.removesuffix("_s"))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_ylabel("mean seconds per item")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_tokens(path: Path, records: list[Record], names: list[str]) -> str | None:
    tasks = [group for group in group_records(records) if group != POOLED]
    panels_data = []
    for task in tasks:
        counts = {name: [r["completion_tokens"] for r in records if _task(r) == task and r["variant"] == name
                         and r.get("completion_tokens") is not None] for name in names}
        counts = {name: values for name, values in counts.items() if values}
        if counts:
            panels_data.append((task, counts))
    if not panels_data:
        return None
    figure = _figure(max(5.0, sum(1.0 + 0.6 * len(counts) for _, counts in panels_data)), 4.0)
    if figure is None:
        return None
    panels = figure.subplots(1, len(panels_data), squeeze=False)[0]
    for axes, (task, counts) in zip(panels, panels_data, strict=True):
        boxes = axes.boxplot(list(counts.values()), patch_artist=True, medianprops={"color": "black"})
        for box, name in zip(boxes["boxes"], counts, strict=True):
            box.set_facecolor(_colour(names, name))
        axes.set_xticks(range(1, len(counts) + 1), labels=list(counts), rotation=30, ha="right")
        axes.set_title(task, fontsize="medium")
    panels[0].set_ylabel("tokens generated per item")
    return _save(figure, path)


def plot_sweeps(path: Path, key: str, sweeps: list[Sweep], groups: dict[str, dict[str, Row]]) -> str | None:
    figure = _figure(6.0, 4.0)
    if figure is None:
        return None
    axes = figure.add_subplot()
    values = [value for sweep in sweeps for value, _ in sweep.points]
    for number, sweep in enumerate(sweeps):
        for g, (group, rows) in enumerate(groups.items()):
            points = [(value, rows[name]) for value, name in sweep.points if name in rows and rows[name].n]
            if not points:
                continue
            accuracy = [100 * row.accuracy for _, row in points]
            below = [100 * (row.accuracy - row.interval[0]) for _, row in points]
            above = [100 * (row.interval[1] - row.accuracy) for _, row in points]
            label = group if len(sweeps) == 1 else f"{group} ({_text(sweep.fixed)})"
            axes.errorbar([value for value, _ in points], accuracy, yerr=[below, above], capsize=3, marker="o",
                          color=f"C{g % 10}", linestyle=("-", "--", ":", "-.")[number % 4], label=label)
    if min(values) > 0 and max(values) / min(values) >= 10:  # learning rates and step counts grow by factors
        axes.set_xscale("log")
    axes.set_xticks(sorted(set(values)), labels=[f"{value:g}" for value in sorted(set(values))])
    axes.minorticks_off()  # a log axis would add its own ticks between the values swept
    axes.set_xlabel(key)
    axes.set_ylabel("accuracy (%), 95% Wilson interval")
    axes.set_ylim(0, 100)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")
    return _save(figure, path)


# -- the report -------------------------------------------------------------------------------------------------

def variant_names(records: list[Record], runs: list[dict[str, Any]]) -> list[str]:
    """The variants with records, in the order the runs named them, then any others as their records come."""
    present = dict.fromkeys(r["variant"] for r in records)
    named = dict.fromkeys(name for run in runs for name in run_variants(run))
    return [name for name in named if name in present] + [name for name in present if name not in named]


def variant_options(records: list[Record], runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict]:
    """Each variant's options as given on the command line (its records'), else run.json's."""
    options: dict[str, dict] = {}
    for name in names:
        given = next((r.get("options") for r in records if r["variant"] == name and r.get("options")), None)
        if given is None:
            given = next((run_variants(run)[name] for run in reversed(runs) if name in run_variants(run)), None)
        if isinstance(given, dict):
            options[name] = given
    return options


def _plot_link(name: str | None, title: str, missing: str) -> str:
    """A link to the plot, or why there is none; without matplotlib, nothing (the report says so once)."""
    if name:
        return f"![{title}]({name})\n"
    return f"({missing})\n" if find_spec("matplotlib") else ""


def remove_old_plots(folder: Path) -> None:
    """The plots of an earlier report that this one may not redraw (a sweep gone, the baseline gone), so that the
    folder never holds a figure its report does not describe."""
    for path in [*(folder / name for name in PLOTS), *folder.glob("sweep-*.png")]:
        path.unlink(missing_ok=True)


def write_report(folder: Path, baseline: str = "direct", variants: list[str] | None = None) -> Path:
    """Write `folder/report.md` and its plots from the folder's records and run.json; return the report's path.
    `variants` limits and orders the variants shown (default: every variant with records)."""
    folder = Path(folder)
    records = read_records(folder)
    runs = read_runs(folder)
    names = list(variants) if variants is not None else variant_names(records, runs)
    shown = [r for r in records if r["variant"] in names or r["variant"] == baseline]
    remove_old_plots(folder)
    parts = header(records, runs, names)
    if not records:
        parts.append("No records yet.\n")
    elif not names:
        parts.append("None of the variants asked for has records.\n")
    else:
        parts += body(folder, shown, runs, names, baseline, records)
    path = folder / REPORT
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def body(folder: Path, records: list[Record], runs: list[dict[str, Any]], names: list[str], baseline: str,
         every: list[Record]) -> list[str]:
    """The report's sections over `records` (the variants shown and the baseline); `every` record of the folder
    counts in the runs' throughput, since the variants not shown ran in the same batches."""
    subsets = group_records(records)
    groups = {group: group_rows(subset, names, baseline) for group, subset in subsets.items()}
    has_baseline = any(r["variant"] == baseline for r in records)
    parts = [] if find_spec("matplotlib") else ["(No plots: they need matplotlib, `pip install 'relat[eval]'`.)\n"]
    parts.append("## Accuracy\n")
    if has_baseline:
        parts.append(f"Wins and losses are counted against `{baseline}` on the items both answered, with the exact "
                     "two-sided sign test over the items where exactly one is right. Errors (failed requests) score "
                     "as wrong.\n")
    else:
        parts.append(f"The baseline `{baseline}` has no records: no wins, losses or replies ≠ baseline, and no "
                     "paired plot. Errors (failed requests) score as wrong.\n")
    for group, rows in groups.items():
        paired = any(r["variant"] == baseline for r in subsets[group])
        note = "" if paired or not has_baseline else f"`{baseline}` has no records here: no paired columns.\n\n"
        parts.append(group_title(group, subsets[group]) + "\n" + note + accuracy_table(rows.values(), baseline,
                                                                                        paired))
        if group != POOLED:
            parts.append(per_file_table(subsets[group], names))
    parts.append(_plot_link(plot_accuracy(folder / "accuracy.png", groups, names), "accuracy per variant and task",
                            "no accuracy plot"))
    if has_baseline:
        parts.append(_plot_link(plot_paired(folder / "paired.png", groups, baseline),
                                f"wins and losses against {baseline}",
                                f"no paired plot: no variant shares items with {baseline}"))

    parts.append("## Reconstruction loss\n")
    parts.append(_plot_link(plot_reconstruction(folder / "reconstruction.png", records, names),
                            "reconstruction loss before and after training",
                            "no variant has reconstruction losses (only relat reports them)"))

    parts.append("## Seconds\n")
    parts.append("Mean seconds per item by phase, from each request's trace; \"other\" is what total_s has beyond "
                 "the phases. With batching, these are latencies under load: a request's seconds overlap those of "
                 "the others in flight. Each run's wall time per request gives the throughput.\n")
    parts.append(phase_table(records, names))
    parts.append("".join(throughput_lines(every, {r.get("run") for r in records})) or "(no run times recorded)\n")
    parts.append(_plot_link(plot_seconds(folder / "seconds.png", records, names), "seconds per phase",
                            "no timings recorded"))

    parts.append("## Tokens generated\n")
    parts.append(_plot_link(plot_tokens(folder / "tokens.png", records, names), "tokens generated per item",
                            "no token counts recorded"))

    sweeps = find_sweeps(variant_options(records, runs, names))
    if sweeps:
        parts.append("## Sweeps\n")
        for key in dict.fromkeys(sweep.key for sweep in sweeps):
            mine = [sweep for sweep in sweeps if sweep.key == key]
            parts += [sweep_table(sweep, groups) for sweep in mine]
            name = f"sweep-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
            parts.append(_plot_link(plot_sweeps(folder / name, key, mine, groups), f"accuracy against {key}",
                                    "no sweep plot"))
    return parts

