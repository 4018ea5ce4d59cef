"""The report of a `relat eval` folder: `report.md` and its plots, from `records.jsonl` and `run.json`
(relat_eval.records), rewritten whole after every run so that it always describes every record there. The numbers
are computed in relat_eval.summary, the plots drawn in relat_eval.plots.

What it shows and why:
- an accuracy table per task and one over all tasks pooled (pairs matched on data file and index). Each accuracy
  comes with its 95% Wilson interval, and each variant with its wins and losses against a baseline (`direct` by
  default) and the exact sign test, because on a few dozen items a difference of two or three is noise
  (relat_eval.stats); the replies that differ from the baseline's, since a method can change many replies and few
  scores; relat's reconstruction loss before and after training, which is no measure of quality (a loss near zero
  went with broken answers, bench/RESULTS.md section 3) but tells whether training ran as meant; the replies cut
  off at max tokens, which score as wrong for reasons that are not the method's; and the failed requests, which
  score as wrong too.
- the seconds per phase (training, latent thinking, decoding). With batching they are latencies under load, so
  each run's wall time per item, its throughput, comes with them.
- accuracy against mean seconds per request, pooled, with its Pareto front: what each variant's accuracy costs.
- sweeps: variants whose options differ in one numeric option alone (relat-l1 and relat-l4 with latent_steps 1 and
  4) get accuracy against that option, a table and a plot each.

Without matplotlib (the `eval` extra) the report is written without its plots.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from relat_eval.plots import (
    PLOTS,
    plot_accuracy,
    plot_cost,
    plot_paired,
    plot_reconstruction,
    plot_seconds,
    plot_sweeps,
    plot_tokens,
)
from relat_eval.records import read_records, read_runs
from relat_eval.stats import mean
from relat_eval.summary import (
    PHASES,
    POOLED,
    Record,
    Row,
    Sweep,
    as_text,
    find_sweeps,
    group_records,
    group_rows,
    p_text,
    pareto_line,
    phase_means,
)

REPORT = "report.md"
RUN_FIELDS = ("model", "machine", "date", "target")  # what the header names for every run of run.json


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
    return None if target is None else as_text(target)


def _run_value(run: dict[str, Any], field: str) -> str | None:
    if field == "target":
        return _target(run)
    if field == "date":
        value = run.get("date") or run.get("started") or run.get("run")
    else:
        value = run.get(field)
    return None if value is None else as_text(value)


def _code(text: str) -> str:
    """Markdown inline code that survives a backtick or a table's bar in the text."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`" if text else "–"


# -- markdown ---------------------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


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
    head += ["recon before → after", "steps run", "trained (gate)", "hit max tokens", "tokens generated", "s/item",
             "p95 s", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.variant, _accuracy_cell(row), _interval_cell(row)]
        if paired:
            if row.paired is None:
                cells += ["(baseline)", "–"]
            elif not row.n:
                cells += ["–", "–"]
            else:
                cells += [f"+{row.paired.wins} / −{row.paired.losses} ({p_text(row.paired.p)})",
                          f"{row.paired.differ}/{row.paired.shared}"]
        recon = "–" if row.recon_before is None else f"{_fmt(row.recon_before)} → {_fmt(row.recon_after)}"
        trained = "–" if row.trained is None else f"{row.trained}/{row.n}"
        cells += [recon, _fmt(row.steps, 1), trained, str(row.length), _fmt(row.tokens, 0), _fmt(row.seconds, 1),
                  _fmt(row.p95_seconds, 1), str(row.errors)]
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
            extra = [f"{key} {as_text(value)}" for key, value in run.items()
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
            text = as_text(value).replace("|", "\\|") or "''"
            if key == "adapter_during_answer" and _answers_from_question_with_adapter(
                    {option: entry[0] for option, entry in full[name].items()}):
                text = f"{as_text(True)} (answer from the question)"
            cells.append(f"**{text}**" if given else text)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("| records | " + " | ".join(str(sum(r["variant"] == n for r in records)) for n in names) + " |")
    return ("Variants: every option each ran with (bold: set by the variant; the rest are the engine's or the "
            "server's defaults).\n\n" + "\n".join(lines) + "\n")


def _answers_from_question_with_adapter(options: dict[str, Any]) -> bool:
    """A relat variant that trains and answers from the question answers through its adapter whatever
    adapter_during_answer says (relat_core's TTTParams.adapter_answers); run.json files written before the trace
    said so hold the option as asked, false."""
    return (options.get("method") == "relat" and options.get("answer_context") == "question"
            and options.get("steps") != 0)  # left out: the defaults, which train


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
    fixed = _code(as_text(sweep.fixed)) if sweep.fixed else "no other option"
    return f"Sweep over `{sweep.key}` ({fixed} fixed), accuracy [95% CI]:\n\n" + "\n".join(lines) + "\n"


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
    parts.append("relat's training loss before and after training: the reconstruction's, or that of the objective a "
                 "variant's options name (prompt_lm, entropy).\n")
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

    parts.append("## Accuracy against seconds\n")
    pooled = groups.get(POOLED) or next(iter(groups.values()))  # one task: its rows are the pooled ones
    parts.append(pareto_line(pooled.values()))
    parts.append(_plot_link(plot_cost(folder / "cost.png", pooled, names), "accuracy against mean seconds per request",
                            "no cost plot: fewer than two variants have seconds"))

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
