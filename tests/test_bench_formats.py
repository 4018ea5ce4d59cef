"""bench/formats.py: a format's answers paired with fp32's, item by item."""

from __future__ import annotations

import json
from pathlib import Path

from .bench_support import load_script


def write(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def record(index: int, correct: bool, reply: str, l0: float | None = None, steps: int = 0) -> dict:
    return {"data": "d.jsonl", "index": index, "variant": "relat", "correct": correct, "reply": reply,
            "recon_before": l0, "recon_after": None if l0 is None else l0 / 2, "steps_run": steps}


def test_a_format_is_paired_with_fp32_on_the_same_items(tmp_path: Path) -> None:
    write(tmp_path / "fp32", [record(0, True, "a", 3.0, 2), record(1, False, "b", 4.0, 2), record(2, True, "c")])
    write(tmp_path / "int8", [record(0, True, "a", 3.1, 2), record(1, True, "B", 3.5), record(2, False, "x"),
                              record(3, True, "only here", 2.0, 2)])
    (row,) = load_script("formats").compare(tmp_path, ["int8"])
    assert (row["items"], row["fp32_correct"], row["correct"]) == (3, 2, 2)  # item 3 has no fp32 answer
    assert (row["wins"], row["losses"], row["identical"]) == (1, 1, 1)
    assert row["trained"] == (2, 1)  # item 3, trained but not in fp32's run, is not counted
    assert abs(row["l0_gap"] - 0.5) < 1e-9 and abs(row["lN_gap"] - 0.25) < 1e-9
