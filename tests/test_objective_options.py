"""The `objective` and `entropy_tokens` options everywhere a TTT option goes: TTTParams' validation, both endpoints
(an unknown objective is a 400 naming the field), the server's default and its `relat serve` flag, `relat ask`'s
flags and trace line, `relat eval`'s variants and the OpenAPI document; and adapter_during_answer as applied in
`relat eval`'s options (issue 26, parts 3 and 5)."""

from __future__ import annotations

import argparse
import io
import json
from types import SimpleNamespace

import pytest
from relat_eval.report import write_report
from relat_eval.runners import LocalRunner
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

from relat_core import Engine, InvalidParameter, TTTParams
from relat_core.params import OBJECTIVES, TTT_BOUNDS

from .conftest import build_tiny
from .server_support import QUESTION, assert_error, one_torch_thread, ready_server

QUICK = {"steps": 2, "latent_steps": 2, "max_tokens": 2}


@pytest.mark.parametrize("fields, param", [({"objective": "magic"}, "objective"),
                                           ({"entropy_tokens": 0}, "entropy_tokens"),
                                           ({"entropy_tokens": 65}, "entropy_tokens")])
def test_ttt_params_refuse_an_unknown_objective_and_a_draft_out_of_range(fields, param):
    with pytest.raises(InvalidParameter) as caught:
        TTTParams(**fields)
    assert caught.value.param == param


@pytest.fixture(scope="module")
def server(tokenizer):
    """A server whose default objective is prompt_lm, as `relat serve --objective prompt_lm` sets it."""
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1)),
                                          objective="prompt_lm") as served:
        yield served


def test_an_unknown_objective_is_a_400_naming_the_field_on_both_endpoints(server):
    chat = {"messages": QUESTION, "relat": {"objective": "magic"}}
    assert_error(server.http.post("/v1/chat/completions", json=chat), 400, param="relat.objective")
    native = {"question": "What is the capital of France?", "objective": "magic"}
    assert_error(server.http.post("/v1/relat", json=native), 400, param="objective")
    too_long = {"question": "What is the capital of France?", "objective": "entropy", "entropy_tokens": 65}
    assert_error(server.http.post("/v1/relat", json=too_long), 400, param="entropy_tokens")


def test_the_objective_reaches_the_engine_from_both_endpoints_over_the_servers_default(server):
    native = server.http.post("/v1/relat", json={"question": "What is the capital of France?", **QUICK,
                                                 "objective": "entropy", "entropy_tokens": 3}).json()
    assert native["trace"]["objective"] == "entropy" and native["trace"]["options"]["entropy_tokens"] == 3
    assert len(native["trace"]["steps"]) == 2
    chat = server.http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, "relat": {
        "steps": 2, "latent_steps": 2}}).json()
    assert chat["relat"]["objective"] == "prompt_lm"  # the server's default
    assert chat["relat"]["options"]["objective"] == "prompt_lm"


def test_serve_has_a_flag_and_an_environment_variable_for_the_default(monkeypatch):
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    settings = settings_from_arguments(parser.parse_args(["--objective", "entropy", "--entropy-tokens", "4"]))
    assert settings.ttt_fields() == {"objective": "entropy", "entropy_tokens": 4}
    with pytest.raises(SystemExit):
        parser.parse_args(["--objective", "magic"])
    monkeypatch.setenv("RELAT_OBJECTIVE", "prompt_lm")
    assert Settings().ttt_fields()["objective"] == "prompt_lm"


def test_ask_has_the_flags_and_its_trace_line_names_the_objectives_loss():
    parser = argparse.ArgumentParser()
    add_ttt_arguments(parser)
    assert ttt_fields_from_arguments(parser.parse_args(["--objective", "prompt_lm"])) == {"objective": "prompt_lm"}
    trace = {"method": "relat", "latent_steps": 4, "adapter_during_answer": True, "answer_context": "question",
             "guidance": 1.0, "contrastive_eta": 0.0, "steps": [], "objective": "entropy",
             "recon_loss_before": 3.5, "recon_loss_after": 1.25, "timings": {}}
    out = io.StringIO()
    print_trace(trace, {"prompt_tokens": 1, "completion_tokens": 1}, stream=out)
    assert "entropy loss 3.5000 -> 1.2500" in out.getvalue()


def test_eval_variants_take_the_objective():
    variant = parse_variant("tent=relat:objective=entropy:entropy_tokens=4")
    assert variant.options == {"method": "relat", "objective": "entropy", "entropy_tokens": 4}
    assert parse_variant("relat:objective=prompt_lm").ttt == {"method": "relat", "objective": "prompt_lm"}
    with pytest.raises(ValueError, match="objective"):
        parse_variant("relat:objective=magic")


def test_the_openapi_document_states_the_objectives():
    doc = create_app(Settings(), load_engine=lambda: None).openapi()
    for component in ("RelatOptions", "RelatRequest"):
        properties = doc["components"]["schemas"][component]["properties"]
        objective = [b for b in properties["objective"]["anyOf"] if b.get("type") != "null"]
        assert objective == [{"type": "string", "enum": list(OBJECTIVES)}]
        entropy_tokens = [b for b in properties["entropy_tokens"]["anyOf"] if b.get("type") != "null"]
        assert entropy_tokens == [TTT_BOUNDS["entropy_tokens"].json_schema()]


# -- part 5: adapter_during_answer as applied in relat eval ------------------------------------------------------

def test_an_in_process_evals_options_say_adapter_during_answer_as_applied():
    runner = object.__new__(LocalRunner)  # full_options reads only the engine's defaults: no model needed
    runner.engine = SimpleNamespace(defaults=TTTParams(answer_context="question"))
    assert runner.full_options(parse_variant("relat"))["adapter_during_answer"] is True
    assert runner.full_options(parse_variant("relat:answer_context=thought"))["adapter_during_answer"] is False
    assert runner.full_options(parse_variant("direct:max_tokens=8")) == {
        **TTTParams(method="direct", answer_context="question").as_applied(), "max_tokens": 8}


def test_the_reports_options_table_shows_adapter_during_answer_as_applied(tmp_path, monkeypatch):
    import relat_eval.plots as plots_module

    monkeypatch.setattr(plots_module, "_save", lambda figure, path: path.write_bytes(b"") or path.name)
    # As a run.json written before the trace said so holds them: the option as asked (False) for every variant.
    options = {"relat": {"method": "relat", "steps": 2, "answer_context": "question"},
               "relat-thought": {"method": "relat", "steps": 2, "answer_context": "thought"},
               "relat-untrained": {"method": "relat", "steps": 0, "answer_context": "question"},
               "direct": {"method": "direct", "answer_context": "question"}}
    run = {"run": "2026-12-06T10:00:00", "model": "m", "variants": {
        name: {"given": {"method": opts["method"]}, "options": {**opts, "adapter_during_answer": False}}
        for name, opts in options.items()}}
    records = [{"data": "d.jsonl", "index": 0, "task": "knowledge", "variant": name, "options": {"method": name},
                "correct": True, "reply": "x", "finish_reason": "stop", "recon_before": None, "recon_after": None,
                "steps_run": 0, "seconds": 1.0, "timings": None, "error": None} for name in options]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "run.json").write_text(json.dumps([run]), encoding="utf-8")
    report = write_report(tmp_path).read_text(encoding="utf-8")
    lines = report.splitlines()
    names = [cell.strip() for cell in next(line for line in lines if line.startswith("| option |")).split("|")[2:-1]]
    row = next(line for line in lines if line.startswith("| adapter_during_answer |"))
    cells = dict(zip(names, [cell.strip() for cell in row.split("|")[2:-1]], strict=True))
    assert cells == {"relat": "True (answer from the question)", "relat-thought": "False",
                     "relat-untrained": "False", "direct": "False"}
