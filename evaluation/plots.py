"""The plots of a `relat eval` report (relat_eval.report): accuracy per variant and task with 95% Wilson
intervals, wins and losses against the baseline, reconstruction loss before and after training, seconds per
phase, tokens generated, accuracy against a swept option, and accuracy against mean seconds per request with its
Pareto front (relat_eval.summary.pareto_front).

Plots are drawn on `matplotlib.figure.Figure` objects, never through pyplot: no display is needed, no backend is
chosen for the caller, and a figure is freed with its last reference. Without matplotlib (the `eval` extra) each
plot function returns None and the report is written without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from relat_eval import summary
from relat_eval.summary import PHASES, POOLED, Record, Row, Sweep, as_text, group_records, p_text, phase_means, task_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS = ("accuracy.png", "paired.png", "reconstruction.png", "seconds.png", "tokens.png", "cost.png")  # + sweep-*.png


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
        axes.set_yticks(list(ys), labels=[f"{row.variant} ({p_text(row.paired.p)})" for row in rows])
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
        counts = {name: [r["completion_tokens"] for r in records if task_of(r) == task and r["variant"] == name
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
            label = group if len(sweeps) == 1 else f"{group} ({as_text(sweep.fixed)})"
            axes.errorbar([value for value, _ in points], accuracy, yerr=[below, above], capsize=3, marker="o",
                          color=f"C{g % 10}", linestyle=("-", "--", ":", "-.")[number % 4], label=label)
            for (value, row), y in zip(points, accuracy, strict=True):
                if row.trained is not None:  # a gate's sweep: what each threshold trained is its cost
                    axes.annotate(f"{100 * row.trained / row.n:.0f}% trained", (value, y), fontsize="x-small",
                                  textcoords="offset points", xytext=(4, 6), color=f"C{g % 10}")
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


def plot_cost(path: Path, rows: dict[str, Row], names: list[str]) -> str | None:
    """Accuracy against mean seconds per request, a point per variant (`rows`: pooled over every data file), the
    Pareto front joined by a line and the variants it dominates faded. None for fewer than two variants."""
    points = summary.cost_points(rows.values())
    if len(points) < 2:
        return None
    figure = _figure(6.0, 4.5)
    if figure is None:
        return None
    axes = figure.add_subplot()
    front = summary.pareto_front(rows.values())
    axes.plot([points[name][0] for name in front], [100 * points[name][1] for name in front], color="black",
              linewidth=1, linestyle="--", zorder=1, label="Pareto front")
    for name, (seconds, accuracy) in points.items():
        low, high = rows[name].interval
        alpha = 1.0 if name in front else 0.35
        axes.errorbar([seconds], [100 * accuracy], yerr=[[100 * (accuracy - low)], [100 * (high - accuracy)]],
                      capsize=3, marker="o", color=_colour(names, name), alpha=alpha, zorder=2)
        trained = rows[name].trained  # a gated variant: the share its gate trained
        label = name if trained is None else f"{name} ({100 * trained / rows[name].n:.0f}% trained)"
        axes.annotate(label, (seconds, 100 * accuracy), xytext=(5, 5), textcoords="offset points",
                      fontsize="small", alpha=alpha)
    seconds = [s for s, _ in points.values()]
    if min(seconds) > 0 and max(seconds) / min(seconds) >= 10:  # a method that trains can cost many times more
        axes.set_xscale("log")
    axes.set_xlabel("mean seconds per request")
    axes.set_ylabel("accuracy (%), 95% Wilson interval")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small", title="faded: dominated", title_fontsize="small")
    return _save(figure, path)
