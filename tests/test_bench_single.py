"""bench/single.py: the table's per-round ratios, and a smoke run of its worker processes on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .bench_support import load_script


def test_each_ratio_is_to_the_naive_request_of_the_same_round() -> None:
    records = [{"round": 1, "variant": "naive", "seconds": 40.0, "train_s": 30.0},
               {"round": 1, "variant": "engine", "seconds": 30.0, "train_s": 20.0},
               {"round": 2, "variant": "engine", "seconds": 47.5, "train_s": 33.0},
               {"round": 2, "variant": "naive", "seconds": 50.0, "train_s": 35.0}]
    rows = load_script("single").table(records, ["engine", "naive"]).splitlines()
    assert rows[2] == "| engine | 2 | 38.75 | 26.50 | 0.75, 0.95 | 0.85 |"
    assert rows[3] == "| naive | 2 | 45.00 | 32.50 | – | – |"


@pytest.mark.slow
def test_smoke_run_pairs_the_engine_with_the_naive_loop(tmp_path: Path) -> None:
    out = tmp_path / "single.jsonl"
    records = load_script("single").main(["--rounds", "1", "--variants", "engine", "naive", "--threads", "1",
                                 "--latent-steps", "1", "--steps", "1", "--max-tokens", "2", "--results", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    assert sorted(r["variant"] for r in records) == ["engine", "naive"]  # round 0, the warm-up, is not kept
    assert {r["round"] for r in records} == {1}
    assert len({r["question"] for r in records}) == 1
    assert all(r["seconds"] > r["train_s"] > 0 for r in records)
