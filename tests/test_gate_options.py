"""The `gate`, `gate_threshold` and `draft_tokens` options everywhere a TTT option goes: both endpoints (an unknown
gate is a 400 naming the field; a kept request's trace says so, with its signal against the threshold), the
server's default and its `relat serve` flag, `relat ask`'s flags and trace lines, `relat eval`'s variants and
records, and the OpenAPI document (issue 26, parts 1 and 2)."""

from __future__ import annotations

import argparse
import io

import pytest
from relat_eval.variants import parse_variant
from relat_server.app import create_app
from relat_server.cli import print_trace
from relat_server.settings import (
    Settings,
    add_settings_arguments,
    add_ttt_arguments,
    settings_from_arguments,
    ttt_fields_from_arguments,
)

from relat_core import Engine
from relat_core.params import GATES, TTT_BOUNDS

from .conftest import build_tiny
from .server_support import QUESTION, assert_error, one_torch_thread, ready_server

QUICK = {"steps": 2, "latent_steps": 2, "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(tokenizer):
    """A server whose default gate is confidence at a threshold no draft is below (every request kept direct), as
    `relat serve --gate confidence --gate-threshold 0` sets it."""
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1)), gate="confidence",
                                          gate_threshold=0.0) as served:
        yield served


def test_an_unknown_gate_is_a_400_naming_the_field_on_both_endpoints(server):
    chat = {"messages": QUESTION, "relat": {"gate": "sometimes"}}
    assert_error(server.http.post("/v1/chat/completions", json=chat), 400, param="relat.gate")
    native = {"question": "What is the capital of France?", "gate": "sometimes"}
    assert_error(server.http.post("/v1/relat", json=native), 400, param="gate")
    too_long = {"question": "What is the capital of France?", "gate": "confidence", "draft_tokens": 65}
    assert_error(server.http.post("/v1/relat", json=too_long), 400, param="draft_tokens")
    not_a_number = {"question": "What is the capital of France?", "gate": "fidelity", "gate_threshold": "high"}
    assert_error(server.http.post("/v1/relat", json=not_a_number), 400, param="gate_threshold")


def test_the_gate_reaches_the_engine_from_both_endpoints_over_the_servers_default(server):
    direct = server.http.post("/v1/relat", json={"question": "What is the capital of France?", **QUICK,
                                                 "method": "direct"}).json()
    kept = server.http.post("/v1/relat", json={"question": "What is the capital of France?", **QUICK}).json()
    assert kept["trace"]["gated"] is True and kept["trace"]["steps"] == []  # the server's default gate
    assert kept["trace"]["gate"]["kind"] == "confidence" and kept["trace"]["gate"]["threshold"] == 0.0
    assert kept["answer"] == direct["answer"]
    trained = server.http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4, "relat": {
        "steps": 2, "latent_steps": 2, "gate": "fidelity", "gate_threshold": -1.0}}).json()
    assert trained["relat"]["gated"] is False and len(trained["relat"]["steps"]) == 2
    assert trained["relat"]["signals"]["l0"] == pytest.approx(trained["relat"]["recon_loss_before"], rel=1e-4)
    ungated = server.http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4, "relat": {
        "steps": 2, "latent_steps": 2, "gate": "none"}}).json()
    assert ungated["relat"]["gated"] is None and ungated["relat"]["gate"] is None
    metrics = server.http.get("/metrics").text
    assert 'relat_gate_decisions_total{decision="kept",gate="confidence"} 1.0' in metrics
    assert 'relat_gate_decisions_total{decision="trained",gate="fidelity"} 1.0' in metrics


def test_serve_has_flags_and_environment_variables_for_the_default(monkeypatch):
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    arguments = parser.parse_args(["--gate", "fidelity", "--gate-threshold", "3.5", "--draft-tokens", "4"])
    assert settings_from_arguments(arguments).ttt_fields() == {"gate": "fidelity", "gate_threshold": 3.5,
                                                               "draft_tokens": 4}
    with pytest.raises(SystemExit):
        parser.parse_args(["--gate", "sometimes"])
    monkeypatch.setenv("RELAT_GATE", "auto")
    assert Settings().ttt_fields()["gate"] == "auto"


def test_ask_has_the_flags_and_its_trace_lines_show_the_gate():
    parser = argparse.ArgumentParser()
    add_ttt_arguments(parser)
    assert ttt_fields_from_arguments(parser.parse_args(["--gate", "confidence", "--gate-threshold", "0.7"])) == {
        "gate": "confidence", "gate_threshold": 0.7}
    trace = {"method": "relat", "latent_steps": 4, "adapter_during_answer": False, "answer_context": "question",
             "guidance": 1.0, "contrastive_eta": 0.0, "steps": [], "gated": True, "timings": {},
             "gate": {"kind": "confidence", "signal": "draft_confidence", "threshold": 0.7, "value": 0.91,
                      "gated": True},
             "signals": {"draft_confidence": 0.91, "draft_entropy": 0.25}}
    out = io.StringIO()
    print_trace(trace, {"prompt_tokens": 1, "completion_tokens": 1}, stream=out)
    assert "gate confidence: draft_confidence 0.9100 against threshold 0.7: kept direct's answer" in out.getvalue()
    assert "signals: draft_confidence=0.9100  draft_entropy=0.2500" in out.getvalue()


def test_eval_variants_take_the_gate():
    variant = parse_variant("gated=relat:gate=fidelity:gate_threshold=3.5")
    assert variant.options == {"method": "relat", "gate": "fidelity", "gate_threshold": 3.5}
    with pytest.raises(ValueError, match="gate"):
        parse_variant("relat:gate=sometimes")


def test_the_openapi_document_states_the_gates():
    doc = create_app(Settings(), load_engine=lambda: None).openapi()
    for component in ("RelatOptions", "RelatRequest"):
        properties = doc["components"]["schemas"][component]["properties"]
        gate = [b for b in properties["gate"]["anyOf"] if b.get("type") != "null"]
        assert gate == [{"type": "string", "enum": list(GATES)}]
        draft_tokens = [b for b in properties["draft_tokens"]["anyOf"] if b.get("type") != "null"]
        assert draft_tokens == [TTT_BOUNDS["draft_tokens"].json_schema()]
