"""The Huginn depth benchmark (bench/huginn.py) at --quick sizes: one row per (num_steps, exit), each setting in its
own subprocess (a few seconds each, most of it importing torch, hence two exits only)."""

from __future__ import annotations

import json
from pathlib import Path

from .bench_support import load_script


def test_quick_run_reports_every_setting(tmp_path: Path) -> None:
    out = tmp_path / "huginn.json"
    bench = load_script("huginn")
    # One thread: the settings run one after another, and two threads on a busy 2-core machine crawl.
    assert bench.main(["--quick", "--exits", "none,kl", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert sorted((row["num_steps"], row["exit"]) for row in rows) == [(2, "kl"), (2, "none"), (4, "kl"),
                                                                        (4, "none")]
    for row in rows:
        assert row["ms_per_token_median"] > 0 and row["ms_per_token_mean"] > 0
        assert len(row["ms_per_token"]) == len(row["recurrences"]) == report["settings"]["decode_tokens"] == 4
        assert 1 <= row["recurrences_min"] <= row["recurrences_max"] <= row["num_steps"]
        assert row["prefill_recurrences_max"] <= row["num_steps"]
        assert row["kv_cache_bytes"] > 0 and row["cache_positions"] == 16 + 4  # the quick prompt and the decode
        if row["exit"] == "none":  # a fixed depth runs exactly num_steps, prompt and answer alike
            assert row["recurrences"] == [row["num_steps"]] * 4
            assert row["prefill_recurrences_min"] == row["prefill_recurrences_max"] == row["num_steps"]
    assert report["machine"]["threads"] == 1 and report["settings"]["config"]["n_embd"] == 64
