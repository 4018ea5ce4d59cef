"""The soak benchmark (bench/soak.py), shortened: a few hundred requests of its mix against `relat serve` on a tiny
model, more at once than the server admits. It passes only if none is lost, no 5xx but the designed 503 and 504
comes back, every malformed request gets a 4xx, and afterwards the server is idle with every adapter slot free,
its base weights' checksum unchanged and its resident memory within 5% of the warm-up's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .bench_support import BENCH, load_script
from .conftest import save_tiny

SOAK = BENCH / "soak.py"


@pytest.fixture(scope="module")
def soak():
    return load_script("soak")


def test_a_short_soak_on_a_tiny_model_passes_every_check(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "tiny-qwen3", tokenizer, seed=0)
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SOAK), "--model", str(model), "--requests", "300", "--warmup", "60",
                          "--max-concurrency", "2", "--max-queue", "2", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    failed = {name: check for name, check in report["checks"].items() if not check["ok"]}
    assert run.returncode == 0 and not failed, f"{failed}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    statuses = report["by_status"]
    assert sum(statuses.values()) == report["requests"] == 300
    assert report["concurrency"] > 2 + 2
    # The mix reached every path it is there for: answers, refusals at capacity, clients that left, bad requests.
    assert statuses.get("200") and statuses.get("429") and statuses.get("client left")
    assert sum(count for label, count in report["by_kind"]["malformed"].items()) > 0
    assert report["admin_at_end"]["adapter_slots"] == 2


def test_a_soak_with_three_tenants_one_hostile_passes_every_check(tmp_path, tokenizer):
    """Issue 28: two polite tenants share the mix while a third floods under its own limits (max_queue 1, 120
    requests a minute): every check still passes, each polite tenant is answered, and the hostile one is answered
    and refused with 429."""
    model = save_tiny(tmp_path / "tiny-qwen3", tokenizer, seed=0)
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SOAK), "--model", str(model), "--requests", "150", "--warmup", "30",
                          "--max-concurrency", "2", "--max-queue", "4", "--threads", "1", "--tenants", "3",
                          "--hostile-max-queue", "1", "--hostile-rpm", "120", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    failed = {name: check for name, check in report["checks"].items() if not check["ok"]}
    assert run.returncode == 0 and not failed, f"{failed}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert {"hostile", "polite1", "polite2"} <= set(report["by_tenant"])
    assert "every polite tenant answered" in report["checks"]
    assert report["by_tenant"]["hostile"].get("429")


def test_the_tenant_checks_fail_on_what_they_are_there_to_catch(soak):
    fine = {"polite1": {"200": 3, "429": 1}, "polite2": {"200": 1}, "hostile": {"200": 2, "429": 9},
            "wrong key": {"401": 2}}
    assert all(check["ok"] for check in soak.tenant_checks(fine).values())
    starved = soak.tenant_checks({**fine, "polite2": {"429": 4}})
    assert not starved["every polite tenant answered"]["ok"]
    unlimited = soak.tenant_checks({**fine, "hostile": {"200": 11}})
    assert not unlimited["the hostile tenant answered and refused with 429"]["ok"]


def test_the_checks_fail_on_what_they_are_there_to_catch(soak):
    idle = {"requests_running": 0, "requests_waiting": 0, "adapter_slots_in_use": 0, "adapter_slots": 2,
            "base_weights_unchanged": True, "base_weights_sha256": "a", "base_weights_sha256_at_start": "a",
            "resident_memory_bytes": 1000}
    fine = [soak.Outcome(0, "complete", "relat", "chat", True, status=200),
            soak.Outcome(1, "deadline", "relat", "native", False, status=504),
            soak.Outcome(2, "disconnect", "direct", "chat", True, left=True),
            soak.Outcome(3, "malformed", "invalid-json", "chat", False, status=400)]
    assert all(check["ok"] for check in soak.checks(fine, idle, idle).values())
    bad = {name: not check["ok"] for name, check in soak.checks(
        [*fine, soak.Outcome(4, "complete", "latent", "chat", True, lost="the stream ended"),
         soak.Outcome(5, "complete", "relat", "native", False, status=500),
         soak.Outcome(6, "malformed", "wrong-type", "chat", False, status=200)],
        idle, {**idle, "requests_waiting": 1, "adapter_slots_in_use": 1, "base_weights_unchanged": False,
               "resident_memory_bytes": 1100}).items()}
    assert all(bad.values()), bad


def test_a_stream_is_settled_by_its_last_event_only(soak):
    assert soak.stream_status("data: [DONE]", "chat", None) == 200
    assert soak.stream_status('data: {"choices": []}', "chat", None) is None
    assert soak.stream_status('data: {"error": {"code": "deadline_exceeded"}}', "chat", None) == 504
    assert soak.stream_status('data: {"error": {"code": "something_new"}}', "chat", None) == 500
    assert soak.stream_status('data: {"text": "x"}', "native", "token") is None
    assert soak.stream_status('data: {"status": 503}', "native", "error") == 503
    assert soak.stream_status("data: {}", "native", "done") == 200
    assert soak.stream_status(": keep-alive", "native", None) is None
