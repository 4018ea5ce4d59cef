"""bench/identical.py, the refactor check: its comparison, and one question of the record answered again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .bench_support import load_script

identical = load_script("identical")


def record(tokens: list[int], text: str = "x") -> dict:
    return {"data": "knowledge_dev.jsonl", "index": 3, "token_ids": tokens, "text": text,
            "recon_loss_before": 1.0, "recon_loss_after": 0.5}


def test_compare_names_where_two_answers_part():
    assert identical.compare(record([1, 2, 3]), record([1, 2, 3])) == []
    (line,) = identical.compare(record([1, 2, 3]), record([1, 2, 4, 5]))
    assert line.startswith("knowledge_dev.jsonl#3: differs after 2 tokens (recorded 3, now 4)")


def test_two_records_compare_without_a_model(tmp_path: Path, capsys):
    head = {"header": True, "threads": 2}
    first = {**record([5, 6]), "data": "knowledge_dev.jsonl", "index": 0}
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("\n".join(json.dumps(r) for r in (head, first)) + "\n")
    new.write_text(json.dumps({**first, "token_ids": [5, 7], "recon_loss_before": 1.5}) + "\n")
    args = ["--file", str(old), "--answers", str(new), "--limit", "1", "--files", "knowledge_dev.jsonl"]
    assert identical.main(args) == 1
    assert "0 of 1 answers identical" in capsys.readouterr().out
    new.write_text(json.dumps(first) + "\n")
    assert identical.main(args) == 0


@pytest.mark.slow
def test_the_first_recorded_question_is_answered_the_same(capsys):
    """The embedded model at the defaults, as recorded; only on the processor that recorded it (another may round
    differently, and that is not a regression)."""
    head = json.loads(identical.RECORD.read_text().splitlines()[0])
    if head.get("cpu") != identical.cpu_model():
        pytest.skip(f"recorded on {head.get('cpu')}, this is {identical.cpu_model()}")
    assert identical.main(["--limit", "1", "--files", "knowledge_dev.jsonl", "--threads", str(head["threads"])]) == 0
    assert "1 of 1 answers identical" in capsys.readouterr().out
