"""`relat eval` end to end on a tiny random model: in this process and through a server, resuming, the records'
fields, the report and plots, and the errors a user can make. Scores of a random model are noise; what is checked
is that every item and variant is answered once, recorded once and reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from relat_eval import cli as eval_cli
from relat_eval.records import read_records, read_runs
from relat_eval.variants import parse_variant, parse_variants
from relat_server.cli import main as relat
from relat_server.settings import Settings

import relat_core
from relat_core import Engine

from .conftest import build_tiny
from .server_support import serve_in_thread, wait_for

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = "steps=1:latent_steps=1"


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread, and the machine is shared
    yield build_tiny("qwen3", tokenizer, seed=3)
    torch.set_num_threads(threads)


@pytest.fixture
def local_model(monkeypatch, tiny_model):
    """`relat eval` without --url loads this tiny model; `loads` counts the loads."""
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        return tiny_model

    monkeypatch.setattr(relat_core, "load_model", load)
    return loads


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path) -> list[str]:
    knowledge = write_jsonl(tmp_path / "k.jsonl", [{"question": f"Question {i}?", "answers": [f"a{i}"]}
                                                   for i in range(3)])
    choice = write_jsonl(tmp_path / "c.jsonl", [{"question": "Which?", "choices": ["x", "y"], "answer": "A"},
                                                {"question": "Which one?", "choices": ["x", "y"], "answer": "B"}])
    return ["--data", str(knowledge), "--data", str(choice)]


def keys(records: list[dict]) -> list[tuple]:
    return sorted((r["data"], r["index"], r["variant"]) for r in records)


EXPECTED = sorted((data, index, variant) for data, n in (("k.jsonl", 3), ("c.jsonl", 2)) for index in range(n)
                  for variant in ("direct", "relat"))


# -- variants ---------------------------------------------------------------------------------------------------

def test_variants_are_a_method_and_any_request_option():
    variants = parse_variants(["direct,latent", f"relat,quick=relat:{QUICK}:lr=1e-3:targets=q_proj+v_proj",
                               "textmas=direct:agents=sequential:max_tokens=64:stop_loss=none"])
    assert [v.name for v in variants] == ["direct", "latent", "relat", "quick", "textmas"]
    quick = variants[3]
    assert quick.options == {"method": "relat", "steps": 1, "latent_steps": 1, "lr": 0.001,
                             "targets": ("q_proj", "v_proj")}
    assert parse_variant("on=relat:adapter_during_answer=true:stop_loss=1").options == {
        "method": "relat", "adapter_during_answer": True, "stop_loss": 1.0}
    textmas = variants[4]
    assert textmas.ttt == {"method": "direct", "agents": "sequential", "stop_loss": None}
    assert textmas.sampling == {"max_tokens": 64}


@pytest.mark.parametrize("spec, message", [
    ("quick=relat:no_such=1", "not key=value"),
    ("quick=relat:steps", "not key=value"),
    ("quick=relat:steps=x", "wants a number"),
    ("quick=relat:adapter_during_answer=maybe", "true or false"),
    ("quick=relat:steps=-1", "steps must be"),
    ("quick=magic", "method must be one of"),
    ("quick=relat:temperature=5", "temperature must be"),
    ("=relat", "want"),
])
def test_bad_variants_are_refused_before_any_model_time(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(spec)


def test_variant_names_must_be_unique():
    with pytest.raises(ValueError, match="unique: relat"):
        parse_variants(["relat,relat=relat:steps=1"])


# -- in this process --------------------------------------------------------------------------------------------

def test_in_process_run_records_every_item_once_and_writes_the_report(tmp_path, data, local_model):
    out = tmp_path / "out"
    status = relat(["eval", *data, "--variants", f"direct,relat=relat:{QUICK}", "--out", str(out), "--batch", "3"])
    assert status == 0
    records = read_records(out)
    assert keys(records) == EXPECTED
    relat_records = [r for r in records if r["variant"] == "relat"]
    assert all(r["recon_before"] is not None and r["steps_run"] == 1 for r in relat_records)
    assert all(r["recon_before"] is None and r["steps_run"] == 0 for r in records if r["variant"] == "direct")
    for record in records:
        assert record["task"] == ("knowledge" if record["data"] == "k.jsonl" else "choice")
        assert record["error"] is None and record["finish_reason"] in ("stop", "length")
        assert record["completion_tokens"] >= 1 and record["timings"]["total_s"] > 0
        assert record["max_tokens"] == (48 if record["task"] == "knowledge" else 32)
        assert isinstance(record["correct"], bool)
    (run,) = read_runs(out)
    assert run["model"] == "tiny-qwen3" and run["records"] == 10
    assert run["target"] == "in-process (batch 3, weights fp32)"  # auto on random weights: fp32
    # The full options: the engine's defaults under what the variant gave.
    assert run["variants"]["relat"]["options"]["steps"] == 1
    assert run["variants"]["relat"]["options"]["rank"] == 8
    report = (out / "report.md").read_text()
    assert "tiny-qwen3" in report and "| relat |" in report
    for name in ("accuracy", "paired", "reconstruction", "seconds", "tokens"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG), name
    # Everything is done: a rerun loads no model and writes nothing.
    loads = len(local_model)
    assert relat(["eval", *data, "--variants", f"direct,relat=relat:{QUICK}", "--out", str(out)]) == 0
    assert len(local_model) == loads and len(read_records(out)) == 10


def test_weights_reach_the_models_loader(tmp_path, data, monkeypatch, tiny_model):
    """--weights int8 loads the model in int8 (relat serve --weights' loader), auto by default; the choices are
    relat_core's (spelled in the CLI so that --help does not import torch)."""
    asked = []

    def load(*args, **kwargs):
        asked.append(kwargs.get("weights"))
        return tiny_model

    monkeypatch.setattr(relat_core, "load_model", load)
    for weights, out in (("int8", "q"), (None, "f")):
        extra = ["--weights", weights] if weights else []
        assert relat(["eval", *data, "--variants", "direct", "--limit", "1", "--out", str(tmp_path / out),
                      *extra]) == 0
    assert asked == ["int8", "auto"]
    from evaluation.cli import WEIGHT_CHOICES
    from relat_core.quantized import WEIGHT_CHOICES as CORE_CHOICES

    assert WEIGHT_CHOICES == CORE_CHOICES


def test_an_interrupted_run_resumes_without_repeating_or_losing_items(tmp_path, data, local_model, monkeypatch):
    out = tmp_path / "out"
    argv = ["eval", *data, "--variants", f"direct,relat=relat:{QUICK}", "--out", str(out), "--batch", "2"]
    update = eval_cli.Progress.update
    seen = []

    def interrupt_after_three(self, record):
        update(self, record)
        seen.append(record)
        if len(seen) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli.Progress, "update", interrupt_after_three)
    assert relat(argv) == 130
    first = read_records(out)
    assert len(first) == 3
    monkeypatch.setattr(eval_cli.Progress, "update", update)
    # A kill mid-write leaves half a line: that request runs again, and the next record is not glued to it.
    with (out / "records.jsonl").open("a") as file:
        file.write('{"data": "c.jsonl", "index": 1, "vari')
    assert relat(argv) == 0
    records = read_records(out)
    assert keys(records) == EXPECTED  # every item and variant, once
    assert records[:3] == first  # what was there is kept as it was
    assert len(read_runs(out)) == 2


def test_a_request_the_engine_refuses_is_recorded_as_an_error(tmp_path, data, local_model):
    out = tmp_path / "out"
    assert relat(["eval", *data, "--variants", "huge=relat:rank=128", "--out", str(out), "--limit", "1"]) == 0
    records = read_records(out)
    assert len(records) == 2
    assert all(r["error"] and "rank" in r["error"] and r["correct"] is False for r in records)
    assert "| huge |" in (out / "report.md").read_text()


@pytest.mark.parametrize("half, indices", [("confirm", [1, 3, 5]), ("search", [2, 4]), ("all", [1, 2, 3, 4, 5])])
def test_halves_split_by_parity_after_start_and_limit(tmp_path, local_model, half, indices):
    items = write_jsonl(tmp_path / "k.jsonl", [{"question": f"Q{i}?", "answers": ["x"]} for i in range(7)])
    out = tmp_path / "out"
    relat(["eval", "--data", str(items), "--start", "1", "--limit", "5", "--half", half,
           "--variants", "direct", "--out", str(out), "--max-tokens", "2"])
    assert sorted(r["index"] for r in read_records(out)) == indices


def test_a_variant_must_keep_its_options_and_an_item_its_question(tmp_path, data, local_model):
    out = tmp_path / "out"
    relat(["eval", *data, "--variants", "direct", "--out", str(out), "--limit", "1"])
    with pytest.raises(SystemExit, match="direct in .*jsonl was run with"):
        relat(["eval", *data, "--variants", "direct=direct:max_tokens=8", "--out", str(out)])
    write_jsonl(tmp_path / "k.jsonl", [{"question": "Another?", "answers": ["a"]}])
    with pytest.raises(SystemExit, match="another question"):
        relat(["eval", *data, "--variants", "direct", "--out", str(out)])


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl", "--variants", "direct"], "no data file"),
    (["--variants", "direct=direct:steps=x"], "wants a number"),
    (["--variants", "direct", "--url", "http://127.0.0.1:9", "--model", "m"], "for an in-process run"),
    (["--variants", "direct", "--url", "http://127.0.0.1:9", "--weights", "int8"], "for an in-process run"),
    (["--variants", "direct", "--batch", "0"], "at least 1"),
])
def test_user_errors_are_one_line(tmp_path, data, argv, message):
    if "--data" not in argv:
        argv = [*data, *argv]
    with pytest.raises(SystemExit, match=message):
        relat(["eval", *argv, "--out", str(tmp_path / "out")])


def test_a_file_of_unknown_items_is_refused(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?"}])
    with pytest.raises(SystemExit, match="cannot tell the task"):
        relat(["eval", "--data", str(bad), "--variants", "direct", "--out", str(tmp_path / "out")])


# -- through a server -------------------------------------------------------------------------------------------

def test_through_a_server_concurrently(tmp_path, data, tiny_model):
    engine = Engine(tiny_model, num_slots=2)
    out = tmp_path / "out"
    with serve_in_thread(Settings(steps=1, latent_steps=1), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        status = relat(["eval", *data, "--variants", "direct,relat,huge=relat:rank=128", "--url", served.url,
                        "--concurrency", "3", "--out", str(out)])
    assert status == 0
    records = read_records(out)
    assert len(records) == 15 and len(set(keys(records))) == 15
    assert all(r["error"] is None for r in records if r["variant"] != "huge")
    # A request the server refuses (400) is recorded as an error, named as the server named it.
    assert all(r["error"].startswith("400") and "rank" in r["error"] for r in records if r["variant"] == "huge")
    assert all(r["steps_run"] == 1 for r in records if r["variant"] == "relat")  # the server's default
    (run,) = read_runs(out)
    assert run["target"] == served.url and run["model"] == tiny_model.name
    assert run["variants"]["relat"]["options"]["steps"] == 1  # learnt from the traces
    assert run["variants"]["relat"]["options"]["rank"] == 8
    assert (out / "accuracy.png").read_bytes().startswith(PNG)


def test_an_unreachable_server_stops_before_recording_anything(tmp_path, data):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        relat(["eval", *data, "--variants", "direct", "--url", "http://127.0.0.1:9", "--out", str(out)])
    assert read_records(out) == []


def test_every_task_format_in_one_run(tmp_path, local_model):
    files = {
        "k.jsonl": [{"question": "Q?", "answers": ["a"]}],
        "m.jsonl": [{"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"}, {"problem": "Find n.", "answer": 7}],
        "c.jsonl": [{"question": "Which?", "choices": ["x", "y"], "answer": "A"}],
        "code.jsonl": [{"prompt": "def one():\n", "test": "def check(f):\n    assert f() == 1\n",
                        "entry_point": "one"}, {"text": "Write two().", "test_list": ["assert two() == 2"]}],
    }
    argv = ["eval", "--variants", "direct", "--max-tokens", "8", "--out", str(tmp_path / "out")]
    for name, items in files.items():
        argv += ["--data", str(write_jsonl(tmp_path / name, items))]
    assert relat(argv) == 0
    records = {(r["data"], r["index"]): r for r in read_records(tmp_path / "out")}
    assert {key: r["task"] for key, r in records.items()} == {
        ("k.jsonl", 0): "knowledge", ("m.jsonl", 0): "maths", ("m.jsonl", 1): "maths", ("c.jsonl", 0): "choice",
        ("code.jsonl", 0): "code", ("code.jsonl", 1): "code"}
    assert records[("m.jsonl", 1)]["gold"] == "7"
    # A random model's 8 tokens are no program: the sandbox ran it and said why it failed.
    assert all(r["predicted"] and r["predicted"] != "passed" for key, r in records.items() if key[0] == "code.jsonl")
    report = (tmp_path / "out" / "report.md").read_text()
    for task in ("### knowledge", "### maths", "### choice", "### code", "### All tasks pooled"):
        assert task in report


class FakeEngine:
    """Finishes request i after 1 + i % 3 steps, so that requests overlap and finish out of order."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.defaults = relat_core.TTTParams()
        self.live: dict[str, list] = {}
        self.admitted: list[str] = []
        self.most_live = 0

    def add_request(self, request_id: str, request) -> None:
        if len(self.live) >= self.num_slots:
            raise relat_core.EngineBusy("no free adapter slot")
        self.live[request_id] = [1 + len(self.admitted) % 3, request]
        self.admitted.append(request_id)
        self.most_live = max(self.most_live, len(self.live))

    def step(self) -> list:
        events = []
        for request_id, entry in list(self.live.items()):
            entry[0] -= 1
            if not entry[0]:
                del self.live[request_id]
                trace = relat_core.Trace("direct", 0, False)
                result = relat_core.Result("a", "stop", relat_core.Usage(4, 1), trace, [1])
                events.append((request_id, relat_core.Finished(result)))
        return events


def test_the_local_runner_keeps_batch_requests_in_flight_in_item_order():
    from relat_eval.runners import Job, LocalRunner

    runner = object.__new__(LocalRunner)  # its engine, without loading a model
    runner.engine, runner.batch = FakeEngine(3), 3
    variants = parse_variants(["direct,relat"])
    jobs = [Job("k.jsonl", index, "knowledge", {}, f"Q{index}?", 4, variant) for index in range(3)
            for variant in variants]
    finished = [job.request_id for job, outcome in runner.run(jobs)]
    assert runner.engine.admitted == [job.request_id for job in jobs]  # item-major admission
    assert runner.engine.most_live == 3
    assert sorted(finished) == sorted(job.request_id for job in jobs) and finished != runner.engine.admitted


def test_max_minutes_admits_nothing_after_the_deadline():
    jobs = list(range(5))
    assert list(eval_cli._until(jobs, deadline=float("inf"))) == jobs
    assert list(eval_cli._until(jobs, deadline=0.0)) == []


def test_a_baseline_left_out_of_the_variants_still_pairs(tmp_path, data, local_model):
    out = tmp_path / "out"
    relat(["eval", *data, "--variants", "direct,latent", "--out", str(out), "--limit", "1", "--max-tokens", "4"])
    relat(["eval", *data, "--variants", "latent", "--baseline", "direct", "--out", str(out), "--report-only"])
    pooled = (out / "report.md").read_text().split("### All tasks pooled")[1].split("![")[0]
    rows = [line.strip("|").split("|") for line in pooled.splitlines() if line.startswith("| latent |")]
    assert len(rows) == 1 and "| direct |" not in pooled  # direct is not shown, but latent is paired with it:
    assert rows[0][4].strip().endswith("/2")  # replies that differ, out of the 2 items both answered
