"""The packing benchmark (bench/packing.py) at smoke size: two questions through a packed and a plain engine on the
embedded model, whose answers it compares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .bench_support import load_script


@pytest.mark.slow
def test_smoke_run_compares_the_answers_of_both_engines(tmp_path: Path) -> None:
    bench = load_script("packing")
    out = tmp_path / "packing.json"
    report = bench.main(["--questions", "2", "--max-tokens", "4", "--batch", "2", "--threads", "1",
                         "--skip-products", "--decode-steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    answers = report["answers"]
    assert answers["questions"] == 2 and answers["errors"] == 0
    assert 0 <= answers["identical_answers"] <= 2 and len(answers["differing"]) == 2 - answers["identical_answers"]
    assert 0 <= answers["largest_loss_difference"] < 1e-3  # the same weights: fp32 rounding apart
    assert set(answers["seconds"]) == {"plain", "packed", "plain-again"}
    assert answers["ttt"]["method"] == "relat"
    steps = report["decode_steps"]
    variants = ("plain", "packed", "shipped")
    assert [(s["rows"], s["variant"]) for s in steps] == [(r, v) for r in (1, 8) for v in variants]
    assert all(s["ms"] > 0 for s in steps)
