"""bench/features.py at smoke size, on a tiny random Qwen3: one timed round of every pair, four tokens each; the
report's structure, the tokens each variant decoded, and the pairing of each ratio (no timing is checked)."""

from __future__ import annotations

import json
from pathlib import Path

from .bench_support import load_script
from .conftest import build_tiny
from .server_support import one_torch_thread


def test_smoke_run_pairs_each_feature_with_its_baseline(tmp_path: Path, tokenizer) -> None:
    bench = load_script("features")
    with one_torch_thread():
        report = bench.main(["--rounds", "1", "--max-tokens", "4", "--batch", "2", "--threads", "1",
                             "--out", str(tmp_path)], loaded=build_tiny("qwen3", tokenizer))
    assert json.loads((tmp_path / "features.json").read_text()) == json.loads(json.dumps(report))
    records = report["records"]
    assert {r["round"] for r in records} == {1}  # round 0, the warm-up, is not kept
    assert sorted((tuple(r["pair"]), r["variant"]) for r in records) == sorted(
        (pair, variant) for pair in bench.PAIRS for variant in pair)
    for record in records:  # every answer forced to the budget: a grammar cannot close it early
        assert record["tokens"] == [4] * (2 if record["variant"] in bench.BATCHED else 1)
        assert record["ms_per_token"] > 0 and record["ms_per_step"] > 0
    grammar = next(r for r in records if r["variant"] == "grammar")
    assert grammar["text_start"].startswith('{"')  # constrained: the schema's object
    assert next(r for r in records if r["variant"] == "logprob_shift")["base_logprobs"] == 4
    summary = report["summary"]
    assert list(summary) == list(bench.VARIANTS)
    for baseline, variant in bench.PAIRS:
        entry = summary[variant]
        assert entry["baseline"] == baseline
        pair = [r for r in records if r["pair"] == [baseline, variant]]
        expected = pair[[r["variant"] for r in pair].index(variant)]["ms_per_step"] / \
            pair[[r["variant"] for r in pair].index(baseline)]["ms_per_step"]
        assert entry["ratios_ms_per_step"] == [expected]  # within the pair, not against another request
    assert summary["latent"]["requests"] == 2  # a variant of one pair and the baseline of another
    table = (tmp_path / "features.md").read_text()
    assert all(f"| {variant} |" in table for variant in bench.VARIANTS)
