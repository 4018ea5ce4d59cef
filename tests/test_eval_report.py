"""relat_eval.stats and relat_eval.report on synthetic records: known counts, intervals and sign tests in the
report's tables, the plots written (valid PNGs), sweeps found only where options differ in one numeric key, and
the folders a report must survive (no baseline, one variant, errors, a variant missing from a task, no records)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import relat_eval.plots as plots_module
import relat_eval.report as report_module
from relat_eval.report import PLOTS, find_sweeps, write_report
from relat_eval.stats import Paired, by_item, mean, pair, sign_test, wilson_interval
from relat_eval.summary import make_row, percentile

matplotlib_image = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OPTIONS = {
    "direct": {"method": "direct"},
    "latent": {"method": "latent"},
    "relat": {"method": "relat"},
    "relat-l1": {"method": "relat", "latent_steps": 1},
    "relat-l4": {"method": "relat", "latent_steps": 4},
}
# The items each variant gets right, per task (10 knowledge items, 8 maths items). Against direct, relat wins
# knowledge items 2..8 and loses item 0: +7 / -1, p = 2 * (1 + 8) / 2**8 = 0.0703125; pooled +8 / -1.
CORRECT = {
    "knowledge": {"direct": {0, 1}, "latent": {0}, "relat": set(range(1, 9)), "relat-l1": {0, 1},
                  "relat-l4": {0, 1, 2, 3}},
    "maths": {"direct": {0}, "latent": set(), "relat": {0, 1}, "relat-l1": set(), "relat-l4": {0, 1, 2}},
}
SIZES = {"knowledge": 10, "maths": 8}
DATA = {"knowledge": "knowledge_dev.jsonl", "maths": "gsm8k_test_dev.jsonl"}


def make_record(task: str, index: int, variant: str) -> dict:
    method = OPTIONS[variant]["method"]
    relat = method == "relat"
    correct = index in CORRECT[task][variant]
    # relat-l1 answers exactly as direct does: 0 replies differ; every other variant differs on every item.
    reply = f"direct says {index}" if variant in ("direct", "relat-l1") else f"{variant} says {index}"
    timings = {"train_s": 1.0 if relat else 0.0, "think_s": 0.5 if method != "direct" else 0.0,
               "first_token_s": 0.1, "decode_s": 0.25}
    timings["total_s"] = sum(timings[k] for k in ("train_s", "think_s", "decode_s")) + 0.25
    return {
        "data": DATA[task], "index": index, "task": task, "variant": variant, "options": OPTIONS[variant],
        "question": f"question {index}", "correct": correct, "reply": reply, "gold": str(index),
        "predicted": None,
        # relat cuts one knowledge reply off at max tokens.
        "finish_reason": "length" if (variant == "relat" and task == "knowledge" and index == 9) else "stop",
        "prompt_tokens": 20, "completion_tokens": 10 + index,
        # Means 2.00 and 0.50 over an even number of items.
        "recon_before": 2.0 + (0.1 if index % 2 else -0.1) if relat else None,
        "recon_after": 0.5 + (0.05 if index % 2 else -0.05) if relat else None,
        "steps_run": 4 if relat else 0, "seconds": timings["total_s"], "timings": timings,
        "run": "2025-12-01T10:00:00", "run_s": 2.0 * (index + 1), "error": None,
    }


def all_records(variants: list[str] | None = None) -> list[dict]:
    variants = variants or list(OPTIONS)
    records = [make_record(task, index, variant) for task, size in SIZES.items() for index in range(size)
               for variant in variants]
    for record in records:
        if record["variant"] == "latent" and record["task"] == "maths" and record["index"] == 7:
            record.update(error="ReadTimeout('timed out')", reply="", correct=False, completion_tokens=None,
                          timings=None, recon_before=None, recon_after=None)
    return records


RUN = {
    "run": "2025-12-01T10:00:00", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "machine": "test box (2 CPUs)",
    "date": "2025-12-01T10:00:00", "target": "in-process", "batch": 4,
    "variants": {name: {**options, "max_tokens": 32} for name, options in OPTIONS.items()},
}


def write_folder(folder: Path, records: list[dict], runs: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if runs is not None:
        (folder / "run.json").write_text(json.dumps(runs), encoding="utf-8")
    return folder


def section(report: str, heading: str) -> str:
    """The text under the heading that starts with `heading`, up to the next heading."""
    start = report.index(heading)
    end = report.find("\n#", start + 1)
    return report[start:] if end == -1 else report[start:end]


def row(text: str, variant: str) -> list[str]:
    """The cells of `variant`'s row in the first table of `text`."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {variant} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def assert_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_SIGNATURE), path
    image = matplotlib_image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture
def undrawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Figures are built but not drawn (a stand-in PNG is written): drawing is most of a report's second, and the
    full report draws every kind of plot."""
    def save(figure, path: Path) -> str:
        path.write_bytes(PNG_SIGNATURE)
        return path.name

    monkeypatch.setattr(plots_module, "_save", save)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = write_folder(tmp_path_factory.mktemp("full"), all_records(), [RUN])
    path = write_report(folder)
    return folder, path.read_text(encoding="utf-8")


# -- stats ------------------------------------------------------------------------------------------------------

def test_wilson_interval_matches_hand_computation():
    # 7/10, z = 1.96: centre 0.89208 / 1.38416 = 0.644492, half-width 1.96 * sqrt(0.021 + 0.009604) / 1.38416
    # = 0.247719.
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.396773, abs=1e-6)
    assert high == pytest.approx(0.892211, abs=1e-6)
    assert wilson_interval(8, 10) == pytest.approx((0.490157, 0.943319), abs=1e-6)
    # Symmetric in right and wrong, inside [0, 1] at the ends, everything when nothing is known.
    assert wilson_interval(3, 10) == pytest.approx((1 - high, 1 - low))
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_sign_test_exact_values_and_edges():
    assert sign_test(7, 1) == 0.0703125  # 2 * (1 + 8) / 256
    assert sign_test(1, 7) == 0.0703125
    assert sign_test(8, 1) == 0.0390625  # 2 * (1 + 9) / 512
    assert sign_test(5, 0) == 0.0625
    assert sign_test(0, 0) == 1.0  # no discordant pair: no evidence
    assert sign_test(3, 3) == 1.0  # the two tails overlap: capped at 1
    assert sign_test(1, 0) == 1.0


def test_pair_counts_shared_items_only():
    def r(correct: bool, reply: str | None) -> dict:
        return {"correct": correct, "reply": reply}

    results = {("a", 0): r(True, "x"), ("a", 1): r(False, " y "), ("a", 2): r(True, None), ("b", 0): r(True, "z")}
    baseline = {("a", 0): r(False, "w"), ("a", 1): r(True, "y"), ("a", 2): r(True, "")}
    paired = pair(results, baseline)
    assert paired == Paired(shared=3, wins=1, losses=1, differ=1)  # whitespace at the ends and no reply aside
    assert paired.p == 1.0
    records = [{"data": "a", "index": 0, "variant": "v", "reply": "first"},
               {"data": "a", "index": 0, "variant": "v", "reply": "again"}]
    assert by_item(records, "v")[("a", 0)]["reply"] == "again"
    assert mean([1.0, None, 2.0]) == 1.5 and mean([None]) is None


def test_rows_count_what_a_gate_trained_and_the_95th_percentile_of_seconds():
    records = {("a", i): {"correct": i % 2 == 0, "seconds": float(i + 1), "gated": i < 3} for i in range(10)}
    row = make_row("gated", records, None)
    assert row.trained == 7  # gated false: the gate trained it
    assert row.p95_seconds == pytest.approx(9.55)  # between the 9th and 10th order statistics, as numpy's default
    assert percentile([3.0], 95) == 3.0 and percentile([], 95) is None
    assert make_row("ungated", {("a", 0): {"correct": True, "seconds": 1.0}}, None).trained is None


def test_find_sweeps_wants_one_numeric_difference():
    sweeps = find_sweeps(OPTIONS)
    assert [(s.key, s.fixed, s.points) for s in sweeps] == [
        ("latent_steps", {"method": "relat"}, [(1.0, "relat-l1"), (4.0, "relat-l4")])]
    # Two options changed at once, a switch, or a value repeated: no sweep.
    assert find_sweeps({"a": {"lr": 1e-3, "steps": 2}, "b": {"lr": 1e-4, "steps": 4}}) == []
    assert find_sweeps({"a": {"agents": True}, "b": {"agents": False}}) == []
    assert find_sweeps({"a": {"lr": 1e-3}, "b": {"lr": 1e-3}}) == []
    two = find_sweeps({"a": {"lr": 1e-3, "steps": 2}, "b": {"lr": 1e-4, "steps": 2}, "c": {"lr": 1e-3, "steps": 8}})
    assert [(s.key, [name for _, name in s.points]) for s in two] == [("lr", ["b", "a"]), ("steps", ["a", "c"])]


# -- the report -------------------------------------------------------------------------------------------------

def test_header_names_runs_and_options(full):
    _, report = full
    assert report.startswith("# Evaluation report\n")
    for text in ("- model: HuggingFaceTB/SmolLM2-135M-Instruct", "- machine: test box (2 CPUs)",
                 "- date: 2025-12-01T10:00:00", "- target: in-process", "batch 4"):
        assert text in report
    # The options table: an option per row, a variant per column, bold where the variant set the option.
    names = row(report, "option")[1:]
    latent_steps = dict(zip(names, row(report, "latent_steps")[1:], strict=True))
    assert latent_steps["relat-l4"] == "**4**" and latent_steps["direct"] == "–"
    assert dict(zip(names, row(report, "records")[1:], strict=True))["relat-l4"] == "18"


def test_task_tables_hold_known_numbers(full):
    _, report = full
    knowledge = section(report, "### knowledge")
    assert "`knowledge_dev.jsonl`; 10 items" in knowledge
    # variant, correct, CI, vs direct, replies differ, recon, steps, trained (gate), max tokens, tokens, s/item,
    # p95 s, errors
    assert row(knowledge, "relat") == ["relat", "8/10 (80%)", "49–94%", "+7 / −1 (p=0.070)", "10/10",
                                       "2.00 → 0.50", "4.0", "–", "1", "14", "2.0", "2.0", "0"]
    assert row(knowledge, "direct")[:5] == ["direct", "2/10 (20%)", "6–51%", "(baseline)", "–"]
    assert row(knowledge, "latent")[3:6] == ["+0 / −1 (p=1.000)", "10/10", "–"]
    assert row(knowledge, "relat-l1")[3:5] == ["+0 / −0 (p=1.000)", "0/10"]  # same replies as direct
    maths = section(report, "### maths")
    assert row(maths, "latent")[1] == "0/8 (0%)" and row(maths, "latent")[-1] == "1"  # one failed request
    assert row(maths, "relat")[3] == "+1 / −0 (p=1.000)"
    pooled = section(report, "### All tasks pooled")
    assert "18 items" in pooled
    assert row(pooled, "relat")[1:4] == ["10/18 (56%)", "34–75%", "+8 / −1 (p=0.039)"]
    assert row(pooled, "latent")[-1] == "1"


def test_seconds_table_and_throughput(full):
    _, report = full
    seconds = section(report, "## Seconds")
    # train, think, decode, other, total, latency
    assert row(seconds, "relat")[1:] == ["1.00", "0.50", "0.25", "0.25", "2.00", "2.00"]
    assert row(seconds, "direct")[1:] == ["0.00", "0.00", "0.25", "0.25", "0.50", "0.50"]
    assert "latencies under load" in seconds
    # One run: 90 records, the last answered at run_s = 2 * 10.
    assert "- run 2025-12-01T10:00:00: 90 requests in 20.0 s wall: 0.22 s per request" in seconds


def test_plots_are_valid_pngs_linked_from_the_report(full):
    folder, report = full
    for name in [*PLOTS, "sweep-latent_steps.png"]:
        assert_png(folder / name)
        assert f"]({name})" in report
    assert sorted(p.name for p in folder.glob("*.png")) == sorted([*PLOTS, "sweep-latent_steps.png"])


def test_sweep_table(full):
    _, report = full
    sweeps = section(report, "## Sweeps")
    assert "Sweep over `latent_steps` (`method=relat` fixed)" in sweeps
    assert row(sweeps, "1") == ["1", "relat-l1", "2/10 (20%) [6–51%]", "0/8 (0%) [0–32%]", "2/18 (11%) [3–33%]"]
    assert row(sweeps, "4")[1:3] == ["relat-l4", "4/10 (40%) [17–69%]"]


def test_other_baseline_no_sweep_and_stale_plots_removed(full, tmp_path, undrawn):
    folder = tmp_path / "copy"
    shutil.copytree(full[0], folder)
    assert (folder / "sweep-latent_steps.png").exists()
    report = write_report(folder, baseline="latent", variants=["latent", "relat"]).read_text(encoding="utf-8")
    assert "## Sweeps" not in report and "relat-l4" not in report
    assert not list(folder.glob("sweep*.png"))  # the earlier report's sweep is gone with it
    knowledge = section(report, "### knowledge")
    assert row(knowledge, "latent")[3] == "(baseline)"
    assert row(knowledge, "relat")[3:5] == ["+8 / −1 (p=0.039)", "10/10"]
    assert "direct" not in knowledge  # not asked for
    assert "90 requests in 20.0 s wall" in report  # the run's throughput counts every variant it ran
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(PLOTS)


def test_without_baseline(tmp_path, undrawn):
    folder = write_folder(tmp_path, all_records(["latent", "relat"]), [RUN])
    report = write_report(folder).read_text(encoding="utf-8")
    assert "The baseline `direct` has no records" in report
    assert "wins / losses" not in report and "| replies ≠" not in report
    assert row(section(report, "### knowledge"), "relat")[:4] == ["relat", "8/10 (80%)", "49–94%", "2.00 → 0.50"]
    assert not (folder / "paired.png").exists() and "paired.png" not in report
    assert (folder / "accuracy.png").exists()


def test_baseline_and_a_variant_missing_from_one_task(tmp_path, undrawn):
    # direct and relat-l4 have no maths records.
    records = [r for r in all_records(["direct", "relat", "relat-l1", "relat-l4"])
               if not (r["variant"] in ("direct", "relat-l4") and r["task"] == "maths")]
    folder = write_folder(tmp_path, records, [RUN])
    report = write_report(folder).read_text(encoding="utf-8")
    maths = section(report, "### maths")
    assert "`direct` has no records here: no paired columns." in maths
    assert "wins / losses" not in maths and row(maths, "relat")[1] == "2/8 (25%)"
    assert row(maths, "relat-l4")[1:3] == ["0/0", "–"]
    assert row(section(report, "### knowledge"), "relat")[3] == "+7 / −1 (p=0.070)"
    assert row(section(report, "### All tasks pooled"), "relat")[3] == "+7 / −1 (p=0.070)"  # pairs: knowledge only
    assert row(section(report, "## Sweeps"), "4")[2:] == ["4/10 (40%) [17–69%]", "–", "4/10 (40%) [17–69%]"]
    assert sorted(p.name for p in folder.glob("*.png")) == sorted([*PLOTS, "sweep-latent_steps.png"])


def test_single_variant_without_run_json(tmp_path, undrawn):
    folder = write_folder(tmp_path, [r for r in all_records(["direct"]) if r["task"] == "knowledge"])
    report = write_report(folder).read_text(encoding="utf-8")
    assert "No run.json" in report
    assert "All tasks pooled" not in report  # one task: the pooled table would repeat it
    assert row(section(report, "### knowledge"), "direct")[:3] == ["direct", "2/10 (20%)", "6–51%"]
    assert "no variant has reconstruction losses" in report
    assert sorted(p.name for p in folder.glob("*.png")) == ["accuracy.png", "seconds.png", "tokens.png"]


def test_no_records_yet(tmp_path):
    folder = write_folder(tmp_path, [], [RUN])
    (folder / "accuracy.png").write_bytes(PNG_SIGNATURE)  # an earlier report's
    report = write_report(folder).read_text(encoding="utf-8")
    assert "No records yet." in report and "- model: HuggingFaceTB/SmolLM2-135M-Instruct" in report
    assert not list(folder.glob("*.png"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No records yet." in write_report(empty).read_text(encoding="utf-8")


def test_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # importing it raises ImportError
    monkeypatch.setattr(report_module, "find_spec", lambda name: None)
    folder = write_folder(tmp_path, all_records(["direct", "relat"]), [RUN])
    report = write_report(folder).read_text(encoding="utf-8")
    assert "No plots: they need matplotlib" in report and ".png" not in report
    assert row(section(report, "### knowledge"), "relat")[3] == "+7 / −1 (p=0.070)"
    assert not list(folder.glob("*.png"))
