"""relat eval's cost axis (issue 26, part 6): relat_eval.summary.pareto_front on hand-made rows (a dominated point,
ties, a single variant, rows without seconds), and the report's Pareto front line and cost.png (relat_eval.plots
.plot_cost) from the synthetic records of tests/test_eval_report.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import relat_eval.plots as plots_module
from relat_eval.plots import PLOTS, plot_cost
from relat_eval.report import write_report
from relat_eval.summary import Row, make_row, pareto_front, pareto_line

from tests.test_eval_report import RUN, all_records, assert_png, section, write_folder

pytest.importorskip("matplotlib.figure")


def cost_row(variant: str, correct: int, n: int = 10, seconds: float | None = 1.0) -> Row:
    return Row(variant=variant, n=n, correct=correct, paired=None, recon_before=None, recon_after=None, steps=None,
               length=0, tokens=None, seconds=seconds, errors=0)


def test_pareto_front_drops_the_dominated_and_lists_the_cheapest_first():
    rows = [cost_row("relat", 8, seconds=4.0), cost_row("direct", 3, seconds=0.5), cost_row("latent", 2, seconds=1.0),
            cost_row("mid", 5, seconds=2.0)]
    # latent is slower than direct and less accurate: dominated; the others each buy accuracy with seconds.
    assert pareto_front(rows) == ["direct", "mid", "relat"]
    assert pareto_line(rows) == "Pareto front (accuracy against mean seconds): direct, mid, relat\n"


def test_pareto_front_ties():
    # Tied on both: neither is strictly better, both stay (in the variants' order).
    assert pareto_front([cost_row("b", 5, seconds=1.0), cost_row("a", 5, seconds=1.0)]) == ["b", "a"]
    # As accurate and slower, or as fast and less accurate: dominated.
    assert pareto_front([cost_row("fast", 5, seconds=1.0), cost_row("slow", 5, seconds=2.0)]) == ["fast"]
    assert pareto_front([cost_row("good", 6, seconds=1.0), cost_row("worse", 5, seconds=1.0)]) == ["good"]


def test_pareto_front_single_variant_and_rows_without_numbers():
    assert pareto_front([cost_row("direct", 0)]) == ["direct"]  # nothing beats it, even at 0%
    # No records, or no seconds recorded: on no front, and they dominate nothing.
    rows = [cost_row("empty", 0, n=0, seconds=None), cost_row("untimed", 10, seconds=None), cost_row("direct", 1)]
    assert pareto_front(rows) == ["direct"]
    assert pareto_front([]) == []
    assert "none" in pareto_line([cost_row("untimed", 10, seconds=None)])


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The figures a report builds, by file name, not drawn (a stand-in PNG is written)."""
    built: dict[str, object] = {}

    def save(figure, path: Path) -> str:
        built[path.name] = figure
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
        return path.name

    monkeypatch.setattr(plots_module, "_save", save)
    return built


def test_report_lists_the_front_and_draws_the_cost_plot(tmp_path, figures):
    # Pooled over both tasks (18 items), mean seconds: direct 0.5, latent 1.0, relat and relat-l* 2.0; correct:
    # direct 3, latent 1, relat 10, relat-l1 2, relat-l4 7. direct and relat are the front.
    folder = write_folder(tmp_path, all_records(), [RUN])
    report = write_report(folder).read_text(encoding="utf-8")
    cost = section(report, "## Accuracy against seconds")
    assert "Pareto front (accuracy against mean seconds): direct, relat\n" in cost
    assert "](cost.png)" in cost and "cost.png" in PLOTS
    axes = figures["cost.png"].axes[0]
    front_line = next(line for line in axes.get_lines() if line.get_label() == "Pareto front")
    assert list(front_line.get_xdata()) == [0.5, 2.0]
    assert list(front_line.get_ydata()) == pytest.approx([100 * 3 / 18, 100 * 10 / 18])
    labels = {text.get_text(): text.get_alpha() for text in axes.texts}
    assert labels == {"direct": 1.0, "latent": 0.35, "relat": 1.0, "relat-l1": 0.35, "relat-l4": 0.35}


def test_single_variant_has_a_front_but_no_cost_plot(tmp_path, figures):
    folder = write_folder(tmp_path, [r for r in all_records(["direct"]) if r["task"] == "knowledge"])
    report = write_report(folder).read_text(encoding="utf-8")
    assert "Pareto front (accuracy against mean seconds): direct\n" in report
    assert "(no cost plot: fewer than two variants have seconds)" in report
    assert "cost.png" not in figures and not (folder / "cost.png").exists()


def test_cost_plot_is_a_valid_png(tmp_path):
    records = all_records(["direct", "relat"])
    rows = {name: make_row(name, {(r["data"], r["index"]): r for r in records if r["variant"] == name}, None)
            for name in ("direct", "relat")}
    assert plot_cost(tmp_path / "cost.png", rows, ["direct", "relat"]) == "cost.png"
    assert_png(tmp_path / "cost.png")


def test_a_gate_threshold_sweep_labels_each_point_with_what_it_trained(tmp_path, figures):
    """Variants that differ only in gate_threshold are a sweep (sweep-gate_threshold.png), each point labelled with
    the share its gate trained, as is each gated point of the cost plot: the gate's whole curve (issue 26, part 6)."""
    records = []
    for name, threshold, trained in (("gate-low", 2.0, 8), ("gate-mid", 3.5, 4), ("gate-high", 5.0, 1)):
        for index in range(10):
            records.append({"data": "d.jsonl", "index": index, "task": "knowledge", "variant": name,
                            "options": {"method": "relat", "gate": "fidelity", "gate_threshold": threshold},
                            "correct": index < 5, "reply": str(index), "finish_reason": "stop", "steps_run": 2,
                            "seconds": 1.0 + trained / 10, "gated": index >= trained, "error": None})
    folder = write_folder(tmp_path, records)
    report = write_report(folder).read_text(encoding="utf-8")
    assert "sweep-gate_threshold.png" in figures and "sweep-gate_threshold.png" in report
    sweep_labels = {text.get_text() for text in figures["sweep-gate_threshold.png"].axes[0].texts}
    assert sweep_labels == {"80% trained", "40% trained", "10% trained"}
    cost_labels = {text.get_text() for text in figures["cost.png"].axes[0].texts}
    assert cost_labels == {"gate-low (80% trained)", "gate-mid (40% trained)", "gate-high (10% trained)"}
