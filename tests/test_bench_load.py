"""bench/load.py's settings and weight formats, and bench/lowbit.py's choice of the kernels' row limit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .bench_support import BENCH, load_script


def load_bench():
    if str(BENCH) not in sys.path:  # load.py imports bench/phases.py beside it
        sys.path.insert(0, str(BENCH))
    return load_script("load")


def test_the_paper_setting_names_every_choice_and_the_defaults_only_the_method() -> None:
    load = load_bench()
    paper = load.method_params(load.parse_args([]))
    assert paper == {**load.METHOD, "cache": False}
    assert paper["latent_steps"] == 16 and paper["steps"] == 5
    assert load.method_params(load.parse_args(["--setting", "defaults"])) == {"method": "relat", "cache": False}
    lever = load.method_params(load.parse_args(["--setting", "defaults", "--backprop-latent-steps", "2"]))
    assert lever == {"method": "relat", "cache": False, "backprop_latent_steps": 2}


def test_the_kernel_row_limit_is_the_last_count_before_the_kernel_loses_on_some_shape() -> None:
    lowbit = load_script("lowbit")

    def row(shape: str, rows: int, kernel: float, deq: float) -> dict:  # the input gradient: the kernel at 2x
        return {"shape": shape, "rows": rows, "int8 kernel": (kernel, 2 * kernel), "int8 deq": (deq, deq),
                "int4 kernel": (deq, deq), "int4 deq": (kernel, kernel)}

    results = [row("a", 1, 0.1, 0.5), row("b", 1, 0.1, 0.5), row("a", 4, 0.3, 0.5), row("b", 4, 0.3, 0.5),
               row("a", 8, 0.4, 0.5), row("b", 8, 0.6, 0.5), row("a", 16, 0.1, 0.5), row("b", 16, 0.1, 0.5)]
    assert lowbit.kernel_max_rows(results, "int8", 0) == 4  # shape b loses at 8; 16 does not count past a loss
    assert lowbit.kernel_max_rows(results, "int8", 1) == 1  # its input gradient (0.6) loses at 4 rows
    assert lowbit.kernel_max_rows(results, "int4", 0) == 0


@pytest.mark.slow
def test_an_engine_run_with_int8_weights_at_the_defaults_records_its_setting(tmp_path: Path, capsys) -> None:
    out = tmp_path / "load.jsonl"
    load_bench().main(["--target", "engine", "--concurrency", "1", "--requests", "1", "--warmup", "0",
                       "--weights", "int8", "--setting", "defaults", "--max-tokens", "2", "--no-floor",
                       "--results", str(out)])
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["weights"] == "int8" and record["setting"] == "defaults" and record["method"] == "relat"
    assert "latent_steps" not in record  # the served defaults, not the paper's
    assert record["error"] is None and record["completion_tokens"] == 2
    assert "weights int8" in capsys.readouterr().out
