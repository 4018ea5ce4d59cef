"""The quality benchmark's driver (bench/quality.py): variants, halves, pairing, summaries and the batched run loop.

No model is loaded: summaries are computed from hand-made records, and the run loop drives a fake engine that
finishes requests out of order, as the real one does when they are batched.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from relat_core import EngineBusy, Finished, Result, TTTParams, Usage
from relat_core.engine import Failed, Trace

from .test_bench_scoring import _bench_module

quality = _bench_module("quality")


def test_parse_variant_types():
    variant = quality.parse_variant(
        "v:method=relat,latent_steps=16,lr=5e-3,adapter_during_answer=true,targets=q_proj+v_proj,stop_loss=none")
    assert variant.name == "v"
    assert variant.overrides == {"method": "relat", "latent_steps": 16, "lr": 0.005, "adapter_during_answer": True,
                                 "targets": ("q_proj", "v_proj"), "stop_loss": None}
    assert quality.parse_variant("relat").overrides == {}
    assert quality.parse_variant("s:stop_loss=1").overrides == {"stop_loss": 1.0}
    for bad in ("v:no_such=1", "v:latent_steps=x", "v:adapter_during_answer=maybe", "v:steps", ":steps=1"):
        with pytest.raises(ValueError):
            quality.parse_variant(bad)


def test_sign_test():
    assert quality.sign_test(0, 0) == 1.0
    assert quality.sign_test(4, 2) == pytest.approx(0.6875)
    assert quality.sign_test(8, 0) == pytest.approx(2 / 256)


# -- helpers ----------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def knowledge_file(path: Path, count: int, prefix: str = "Q") -> Path:
    return write_jsonl(path, [{"question": f"{prefix}{i}?", "answers": [f"a{i}"]} for i in range(count)])


def record(variant: str, index: int, correct: bool, reply: str = "", data: str | None = "k.jsonl",
           question: str | None = None, **extra) -> dict:
    """A results line with the fields the summary reads; `data=None` writes one from before --data repeated."""
    row = {"index": index, "variant": variant, "spec": f"method={variant}", "kind": "knowledge",
           "question": question or f"Q{index}?", "correct": correct, "reply": reply or f"{variant} {correct}",
           "recon_before": None, "recon_after": None, "steps_run": 0, "finish_reason": "stop", "seconds": 1.0,
           **extra}
    if data is not None:
        row["data"] = data
    return row


def summarise(tmp_path: Path, capsys, *argv: str) -> str:
    quality.main(["--summary-only", "--out", str(tmp_path / "out.jsonl"), *argv])
    return capsys.readouterr().out


# -- halves -----------------------------------------------------------------------------------------------------

def test_halves_split_by_parity_after_start_and_limit(tmp_path):
    data = knowledge_file(tmp_path / "k.jsonl", 10)
    for half, expected in [("all", [3, 4, 5, 6, 7]), ("search", [4, 6]), ("confirm", [3, 5, 7])]:
        args = quality.parse_args(["--data", str(data), "--start", "3", "--limit", "5", "--half", half,
                                   "--out", str(tmp_path / "o.jsonl")])
        items = quality.load_datasets(args)["k.jsonl"].items
        assert list(items) == expected
        assert all(items[i]["question"] == f"Q{i}?" for i in expected)  # an item keeps its line index
    halves = [quality.select_half(dict.fromkeys(range(7), {}), half) for half in ("search", "confirm")]
    assert sorted(halves[0].keys() | halves[1].keys()) == list(range(7)) and not halves[0].keys() & halves[1].keys()


def test_summary_header_names_the_half(tmp_path, capsys):
    data = knowledge_file(tmp_path / "k.jsonl", 6)
    write_jsonl(tmp_path / "out.jsonl", [record("direct", i, True) for i in range(6)])
    text = summarise(tmp_path, capsys, "--data", str(data), "--half", "confirm")
    assert "items 1–5 (3), confirm half (odd indices)" in text
    assert "| direct | `method=direct` | 3/3 (100%) |" in text


# -- pairing ----------------------------------------------------------------------------------------------------

def test_wins_and_losses_against_both_baselines():
    outcomes = {  # index: (direct, latent, relat)
        0: (True, True, True), 1: (False, False, True), 2: (False, True, True), 3: (True, False, False),
        4: (True, True, False), 5: (False, False, False),
    }
    records = [record(name, i, row[k]) for i, row in outcomes.items()
               for k, name in enumerate(("direct", "latent", "relat"))]
    rows = {row["variant"]: row for row in quality.summary_rows(records, ["direct", "latent", "relat"],
                                                                "direct", "latent")}
    relat = rows["relat"]
    assert (relat["correct"], relat["n"]) == (3, 6)
    assert (relat["vs_direct"].wins, relat["vs_direct"].losses) == (2, 2)  # +1, +2; −3, −4
    assert (relat["vs_latent"].wins, relat["vs_latent"].losses) == (1, 1)  # +1; −4
    assert relat["vs_direct"].p == quality.sign_test(2, 2)
    assert rows["latent"]["vs_direct"].wins == 1 and rows["latent"]["vs_direct"].losses == 1
    assert rows["direct"]["vs_direct"] is None and rows["latent"]["vs_latent"] is None  # not against itself


def test_a_missing_baseline_shows_a_dash():
    records = [record("direct", 0, True), record("relat", 0, False)]
    (direct, relat) = quality.summary_rows(records, ["direct", "relat"], "direct", "latent")
    assert relat["vs_latent"] is None and relat["vs_direct"].losses == 1
    table = quality.markdown_table([direct, relat], "direct", "latent").splitlines()
    assert "vs direct: wins / losses" in table[0] and "vs latent: wins / losses" in table[0]
    assert table[3].startswith("| relat | `method=relat` | 0/1 (0%) | +0 / −1 (p=1.000) | – | 1/1 |")


def test_a_baseline_pairs_even_when_not_among_the_rows():
    records = [record("direct", 0, False), record("relat", 0, True)]
    (relat,) = quality.summary_rows(records, ["relat"], "direct", "latent")
    assert relat["vs_direct"].wins == 1


def test_replies_that_differ_from_direct():
    records = [
        record("direct", 0, True, "Jupiter."), record("relat", 0, True, "  Jupiter.\n"),  # same after strip
        record("direct", 1, True, "Au"), record("relat", 1, True, "Au is gold"),  # differs, both right
        record("direct", 2, False, "x"), record("relat", 2, True, "y"),
        record("relat", 3, True, "only relat answered"),  # unpaired: neither counted nor shared
    ]
    (relat,) = quality.summary_rows(records, ["relat"], "direct", "latent")
    assert (relat["vs_direct"].differ, relat["vs_direct"].shared) == (2, 3)
    assert "| 2/3 |" in quality.markdown_table([relat], "direct", "latent")


def test_tokens_generated_per_request_count_what_was_recorded():
    """Multi-agent variants generate far more than their answers: the column is the mean of the usage's
    completion tokens (agents included); records written before it existed are left out of the mean."""
    records = [record("text-seq", 0, True, completion_tokens=200), record("text-seq", 1, True, completion_tokens=100),
               record("text-seq", 2, True)]
    (row,) = quality.summary_rows(records, ["text-seq"], "direct", "latent")
    assert row["tokens"] == 150
    assert "| 150 |" in quality.markdown_table([row], "direct", "latent")


# -- several files ----------------------------------------------------------------------------------------------

def test_pooled_summary_over_two_files(tmp_path, capsys):
    first = knowledge_file(tmp_path / "a.jsonl", 2, "A")
    second = knowledge_file(tmp_path / "b.jsonl", 2, "B")
    write_jsonl(tmp_path / "out.jsonl", [
        # a.jsonl: relat wins on 0; b.jsonl: relat loses on 0 and wins on 1. Same indices, other questions:
        # pairing on the index alone would mix the files up.
        record("direct", 0, False, data="a.jsonl", question="A0?"), record("relat", 0, True, data="a.jsonl",
                                                                            question="A0?"),
        record("direct", 1, True, "same", data="a.jsonl", question="A1?"),
        record("relat", 1, True, "same", data="a.jsonl", question="A1?"),
        record("direct", 0, True, data="b.jsonl", question="B0?"), record("relat", 0, False, data="b.jsonl",
                                                                           question="B0?"),
        record("direct", 1, False, data="b.jsonl", question="B1?"), record("relat", 1, True, data="b.jsonl",
                                                                            question="B1?"),
        record("relat", 1, True, data="c.jsonl", question="C1?"),  # another file: in no table
    ])
    text = summarise(tmp_path, capsys, "--data", str(first), "--data", str(second))
    tables = text.split("\n\n")
    assert tables[0].startswith(f"knowledge: {first}, items 0–1 (2)")
    assert "| relat | `method=relat` | 2/2 (100%) | +1 / −0 (p=1.000) | – | 1/2 |" in tables[1]
    assert tables[2].startswith(f"knowledge: {second}, items 0–1 (2)")
    assert "| relat | `method=relat` | 1/2 (50%) | +1 / −1 (p=1.000) | – | 2/2 |" in tables[3]
    assert tables[4].startswith("knowledge: all 2 files pooled (2 + 2 items, pairs matched on file and index)")
    assert "| relat | `method=relat` | 3/4 (75%) | +2 / −1 (p=1.000) | – | 3/4 |" in tables[5]
    assert (tmp_path / "out.md").read_text(encoding="utf-8") == text.removesuffix("\n")


def test_old_records_without_data_belong_to_the_single_file(tmp_path, capsys):
    data = knowledge_file(tmp_path / "k.jsonl", 2)
    write_jsonl(tmp_path / "out.jsonl", [record("direct", 0, False, data=None), record("relat", 0, True, data=None),
                                         record("relat", 1, True, data=None)])
    text = summarise(tmp_path, capsys, "--data", str(data), "--variant", "direct:method=direct",
                     "--variant", "relat:method=relat")
    assert "| relat | `method=relat` | 2/2 (100%) | +1 / −0 (p=1.000) | – | 1/1 |" in text
    assert "Throughput" not in text  # records from before --batch: their seconds are already per request
    other = knowledge_file(tmp_path / "other.jsonl", 2)
    with pytest.raises(SystemExit, match="without a data file name"):
        summarise(tmp_path, capsys, "--data", str(data), "--data", str(other))


def test_a_reused_output_file_must_hold_the_same_questions(tmp_path, capsys):
    data = knowledge_file(tmp_path / "k.jsonl", 2)
    write_jsonl(tmp_path / "out.jsonl", [record("direct", 1, True, question="another question?")])
    with pytest.raises(SystemExit, match="another question"):
        summarise(tmp_path, capsys, "--data", str(data))


# -- the batched run loop ---------------------------------------------------------------------------------------

class FakeClock:
    """Stands for the `time` module in quality: one fake second per engine step."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    @staticmethod
    def strftime(_: str) -> str:
        return "run-1"


class FakeEngine:
    """Finishes request i of a run after 1 + i % 3 steps (so they overlap and finish out of order); a variant
    named `boom` fails; replies name the item, so `correct` follows from the gold answer."""

    def __init__(self, clock: FakeClock, num_slots: int) -> None:
        self.clock, self.num_slots = clock, num_slots
        self.defaults = TTTParams()
        self.live: dict[str, list] = {}  # request id -> [steps left, request]
        self.admitted: list[str] = []
        self.most_live = 0

    def add_request(self, request_id: str, request) -> None:
        if len(self.live) >= self.num_slots:
            raise EngineBusy("no free adapter slot")
        self.live[request_id] = [1 + len(self.admitted) % 3, request]
        self.admitted.append(request_id)
        self.most_live = max(self.most_live, len(self.live))

    def step(self) -> list:
        self.clock.now += 1
        events = []
        for request_id in list(self.live):
            entry = self.live[request_id]
            entry[0] -= 1
            if entry[0]:
                continue
            del self.live[request_id]
            if request_id.endswith(":boom"):
                events.append((request_id, Failed(RuntimeError("out of memory"))))
                continue
            question = entry[1].messages[0]["content"]
            reply = f"a{question[1:-1]}"  # Q3? -> a3
            trace = Trace(entry[1].ttt.method, 0, False)
            events.append((request_id, Finished(Result(reply, "stop", Usage(4, 2), trace, [1, 2]))))
        return events


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    engines: list[FakeEngine] = []

    def make_engine(_loaded, num_slots: int) -> FakeEngine:
        engines.append(FakeEngine(clock, num_slots))
        return engines[-1]

    monkeypatch.setattr(quality, "time", clock)
    monkeypatch.setattr(quality, "Engine", make_engine)
    monkeypatch.setattr(quality, "load_model", lambda: None)
    monkeypatch.setattr(quality.torch, "set_num_threads", lambda _: None)
    return SimpleNamespace(clock=clock, engines=engines)


def test_batched_run_keeps_k_in_flight_and_writes_every_record(tmp_path, capsys, fake):
    data = knowledge_file(tmp_path / "k.jsonl", 4)
    argv = ["--data", str(data), "--out", str(tmp_path / "out.jsonl"), "--batch", "3", "--half", "search",
            "--variant", "direct:method=direct", "--variant", "relat"]
    quality.main(argv)
    engine = fake.engines[0]
    assert engine.num_slots == 3 and engine.most_live == 3
    # Question-major admission over the search half (0, 2), though requests finish out of order.
    assert engine.admitted == ["k.jsonl#0:direct", "k.jsonl#0:relat", "k.jsonl#2:direct", "k.jsonl#2:relat"]
    records = quality.read_records(tmp_path / "out.jsonl", None)
    assert sorted((r["index"], r["variant"]) for r in records) == [(0, "direct"), (0, "relat"), (2, "direct"),
                                                                   (2, "relat")]
    assert all(r["correct"] and r["data"] == "k.jsonl" and r["batch"] == 3 and r["run"] == "run-1" for r in records)
    # Latency from admission to answer: the fourth request waited for a slot, then took one step.
    latency = {(r["index"], r["variant"]): (r["seconds"], r["run_s"]) for r in records}
    assert latency[(2, "relat")] == (1.0, 2.0) and latency[(2, "direct")] == (3.0, 3.0)
    text = capsys.readouterr().out
    assert "| relat | `defaults` | 2/2 (100%) | +0 / −0 (p=1.000) | – | 0/2 |" in text
    assert "| 1.5 (batch 3) |" in text  # the relat records' mean latency: (2 + 1) / 2
    assert "- run run-1: 4 requests, batch 3, 3.0 s wall from the first admission to the last answer: " \
           "0.75 s per request" in text
    quality.main(argv)  # everything is done: a rerun starts no engine
    assert len(fake.engines) == 1


def test_max_minutes_stops_admitting_and_finishes_those_in_flight(tmp_path, capsys, fake):
    data = knowledge_file(tmp_path / "k.jsonl", 5)
    quality.main(["--data", str(data), "--out", str(tmp_path / "out.jsonl"), "--batch", "2",
                  "--max-minutes", str(1.5 / 60), "--variant", "direct:method=direct"])
    engine = fake.engines[0]
    # Two admitted at 0 s; #0 finishes at 1 s, #2 is admitted; at 2 s the deadline (1.5 s) has passed.
    assert engine.admitted == ["k.jsonl#0:direct", "k.jsonl#1:direct", "k.jsonl#2:direct"]
    assert sorted(r["index"] for r in quality.read_records(tmp_path / "out.jsonl", None)) == [0, 1, 2]
    assert "stopping: --max-minutes" in capsys.readouterr().out


def test_a_failed_request_stops_the_benchmark(tmp_path, fake):
    data = knowledge_file(tmp_path / "k.jsonl", 2)
    with pytest.raises(SystemExit, match="k.jsonl#0:boom failed: RuntimeError"):
        quality.main(["--data", str(data), "--out", str(tmp_path / "out.jsonl"), "--batch", "2",
                      "--variant", "direct:method=direct", "--variant", "boom:method=direct"])
    # What finished before the failure is kept: a rerun resumes after it.
    assert [r["variant"] for r in quality.read_records(tmp_path / "out.jsonl", None)] == ["direct"]
