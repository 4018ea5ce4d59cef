"""The API's schema, parameter mapping, error mapping and settings, without a model or a server."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import warnings

import pytest
from pydantic import ValidationError
from relat_client import AgentTurn
from relat_client.client import SSEParser, _event
from relat_server.cli import main
from relat_server.errors import (
    DeadlineExceeded,
    ModelNotFound,
    PayloadTooLarge,
    PromptTooLong,
    QueueFull,
    Unauthorized,
    Unavailable,
    describe,
)
from relat_server.protocol import ChatCompletionRequest, RelatRequest, ServerDefaults, engine_request, request_models
from relat_server.settings import Settings, add_settings_arguments, settings_from_arguments
from starlette.exceptions import HTTPException

from relat_core import EngineBusy, InvalidParameter, TTTParams

USER = [{"role": "user", "content": "hi"}]
DEFAULTS = ServerDefaults(TTTParams(steps=3), {"max_tokens": 256})


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


def to_engine(body: ChatCompletionRequest, defaults: ServerDefaults = DEFAULTS):
    ttt = body.relat.ttt_fields() if body.relat else {}
    return engine_request(USER, ttt, body.sampling_fields(), defaults, "relat.")


# -- requests ---------------------------------------------------------------------------------------------------

def test_nulls_mean_defaults_as_in_openai():
    body = chat(stream=None, n=None, temperature=None, stream_options=None, relat=None)
    assert not body.stream and not body.include_usage


def test_minimal_chat_request_and_openai_shapes():
    body = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "stream": True, "stream_options": {"include_usage": True}, "stop": "\n"})
    assert body.include_usage and body.n is None and body.relat is None  # n left out: one answer
    assert body.messages[1].content[1].text == "b"


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),  # OpenAI's deprecated role
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"relat": {"method": "magic"}}, "relat.method"),
    ({"relat": {"answer_context": "both"}}, "relat.answer_context"),
    ({"relat": {"mapping": "hard"}}, "relat.mapping"),
    ({"relat": {"agents": "bogus"}}, "relat.agents"),
    ({"relat": {"answer_format": "xml"}}, "relat.answer_format"),
    ({"relat": {"timeout": -1}}, "relat.timeout"),
    ({"stream_options": "yes"}, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
])
def test_invalid_fields_are_400_naming_the_field(fields, param):
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"messages": USER, **fields})
    info = describe(caught.value)
    assert info.status == 400 and info.type == "invalid_request_error"
    assert info.param == param and info.message.startswith(param + ": ")


@pytest.mark.parametrize("body", [[], [1, 2], "text", 3, None])
def test_a_body_that_is_not_an_object_is_a_400(body):
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    assert describe(caught.value).status == 400


def test_unknown_openai_fields_are_accepted_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="relat_server"):
        body = chat(service_tier="auto", prediction=None, relat={"steps": 1})
    assert body.model_extra == {"service_tier": "auto", "prediction": None}
    assert "service_tier" in caplog.text and "prediction" in caplog.text


@pytest.mark.parametrize("model, body, param, message", [
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "relat": {"latent_step": 16}},
     "relat.latent_step", "relat.latent_step: unknown field; did you mean latent_steps?"),
    (RelatRequest, {"question": "hi", "gatee": "none"}, "gatee", "gatee: unknown field; did you mean gate?"),
    (RelatRequest, {"question": "hi", "zzz": 1}, "zzz", "zzz: unknown field"),
])
def test_unknown_fields_of_our_own_api_are_a_400_naming_them_with_the_closest_known_name(model, body, param, message):
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    info = describe(caught.value)
    assert (info.status, info.param, info.message) == (400, param, message)


def test_max_tokens_is_deprecated_but_honoured_and_max_completion_tokens_wins():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading it on the client's behalf must not warn
        assert to_engine(chat(max_tokens=7)).sampling.max_tokens == 7
        assert to_engine(chat(max_tokens=7, max_completion_tokens=9)).sampling.max_tokens == 9
    assert ChatCompletionRequest.model_fields["max_tokens"].deprecated


def test_native_request_puts_ttt_fields_at_the_top():
    body = RelatRequest.model_validate({"question": "q", "system": "s", "steps": 4, "max_tokens": 5, "seed": 1,
                                        "ignore_eos": True})
    assert body.messages() == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    request = engine_request(body.messages(), body.ttt_fields(), body.sampling_fields(), DEFAULTS)
    assert (request.ttt.steps, request.sampling.max_tokens, request.sampling.seed) == (4, 5, 1)
    assert request.sampling.ignore_eos


def test_ignore_eos_is_vllms_extension_and_off_by_default():
    assert to_engine(chat(ignore_eos=True)).sampling.ignore_eos
    assert not to_engine(chat()).sampling.ignore_eos and not to_engine(chat(ignore_eos=None)).sampling.ignore_eos
    with pytest.raises(ValidationError):
        RelatRequest.model_validate({"question": ""})


# -- request -> engine parameters -----------------------------------------------------------------------------

def test_precedence_request_then_server_then_openai():
    server = ServerDefaults(TTTParams(steps=3, lr=0.01), {"max_tokens": 64, "temperature": 0.3})
    plain = to_engine(chat(), server)
    assert (plain.sampling.temperature, plain.sampling.max_tokens, plain.sampling.top_p) == (0.3, 64, 1.0)
    assert (plain.ttt.steps, plain.ttt.lr) == (3, 0.01)
    openai_default = to_engine(chat(), DEFAULTS)
    assert openai_default.sampling.temperature == 1.0  # OpenAI's default when neither request nor server says
    sent = to_engine(chat(temperature=0, relat={"steps": 5, "targets": ["q_proj"], "lr": None}), server)
    assert (sent.sampling.temperature, sent.ttt.steps, sent.ttt.targets, sent.ttt.lr) == (0, 5, ("q_proj",), 0.01)
    assert to_engine(chat(stop="END")).sampling.stop == ("END",)


@pytest.mark.parametrize("relat, param", [({"steps": 1000}, "relat.steps"), ({"rank": 0}, "relat.rank"),
                                          ({"lr": 0.0}, "relat.lr"), ({"guidance": 12.5}, "relat.guidance"),
                                          ({"contrastive_eta": -0.1}, "relat.contrastive_eta"),
                                          ({"soft_temperature": 0.0}, "relat.soft_temperature"),
                                          ({"agent_max_tokens": 0}, "relat.agent_max_tokens"),
                                          ({"stop_loss": -1.0}, "relat.stop_loss")])
def test_ttt_bounds_are_the_engines_and_errors_name_the_field_as_sent(relat, param):
    """The request classes check the numeric bounds of TTTParams with its own words (relat_core.params.Bound)."""
    with pytest.raises(ValidationError) as caught:
        chat(relat=relat)
    info = describe(caught.value)
    assert info.status == 400 and info.param == param
    with pytest.raises(InvalidParameter) as engine:
        TTTParams(**relat)
    assert info.message == f"{param}: {engine.value}"


@pytest.mark.parametrize("relat, param", [({"targets": ["nope"]}, "relat.targets[0]"),
                                          ({"targets": []}, "relat.targets"),
                                          ({"reconstruction_instruction": "  "}, "relat.reconstruction_instruction")])
def test_other_ttt_rules_are_in_the_request_classes_too(relat, param):
    with pytest.raises(ValidationError) as caught:
        chat(relat=relat)
    assert describe(caught.value).param == param
    with pytest.raises(InvalidParameter):
        TTTParams(**{k: tuple(v) if k == "targets" else v for k, v in relat.items()})


def test_a_rule_across_fields_is_the_engines_and_names_the_field_as_sent():
    with pytest.raises(InvalidParameter) as caught:
        to_engine(chat(relat={"method": "relat", "latent_steps": 0}))
    assert caught.value.param == "relat.latent_steps" and describe(caught.value).status == 400


@pytest.mark.parametrize("fields, param", [({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
                                           ({"top_k": -1}, "top_k"), ({"stop": ""}, "stop"),
                                           ({"stop": ["a", ""]}, "stop[1]"), ({"max_tokens": 0}, "max_tokens")])
def test_sampling_bounds_are_the_engines(fields, param):
    with pytest.raises(ValidationError) as caught:
        chat(**fields)
    assert describe(caught.value).param == param


@pytest.mark.parametrize("fields, param", [({"max_completion_tokens": "8"}, "max_completion_tokens"),
                                           ({"temperature": "0.5"}, "temperature"), ({"stream": "true"}, "stream"),
                                           ({"relat": {"steps": True}}, "relat.steps"),
                                           ({"relat": {"lr": float("nan")}}, "relat.lr"),
                                           ({"relat": {"timeout": float("inf")}}, "relat.timeout"),
                                           ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content")])
def test_types_are_taken_strictly_as_openai_does(fields, param):
    with pytest.raises(ValidationError) as caught:
        chat(**fields)
    assert describe(caught.value).param == param
    assert chat(temperature=1, max_completion_tokens=8).temperature == 1.0  # an integer is a number


def test_a_servers_limits_narrow_its_request_classes_with_a_message_that_says_so():
    models = request_models({"steps": 3, "latent_steps": 5, "rank": 8, "agent_max_tokens": 16}, 4)
    question = {"messages": USER}
    for fields, param in [({"steps": 4}, "relat.steps"), ({"latent_steps": 6}, "relat.latent_steps"),
                          ({"rank": 9}, "relat.rank"), ({"agent_max_tokens": 17}, "relat.agent_max_tokens")]:
        with pytest.raises(ValidationError) as caught:
            models.chat.model_validate({**question, "relat": fields})
        info = describe(caught.value)
        assert info.status == 400 and info.param == param
        assert info.message.endswith(f"must be at most {next(iter(fields.values())) - 1} on this server, "
                                     f"got {next(iter(fields.values()))}")
        with pytest.raises(ValidationError) as caught:
            models.native.model_validate({"question": "q", **fields})
        assert describe(caught.value).param == param.removeprefix("relat.")
    body = models.chat.model_validate({**question, "relat": {"steps": 3, "latent_steps": 5}})
    assert to_engine(body).ttt.steps == 3 and isinstance(body, ChatCompletionRequest)
    assert ChatCompletionRequest.model_validate({**question, "relat": {"steps": 100}}).relat.steps == 100


# -- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, status", [
    (Unauthorized("x"), 401), (ModelNotFound("x"), 404), (PayloadTooLarge("x"), 413), (PromptTooLong("x"), 413),
    (QueueFull("x", retry_after=3), 429), (Unavailable("x"), 503), (DeadlineExceeded("x"), 504),
    (EngineBusy("x"), 503), (HTTPException(404), 404), (HTTPException(405), 405),
])
def test_error_classes_map_to_their_status(error, status):
    info = describe(error)
    assert info.status == status
    assert set(info.body()["error"]) == {"message", "type", "param", "code"}


def test_retry_after_goes_into_the_headers():
    assert describe(QueueFull("full", retry_after=7)).headers == {"Retry-After": "7"}


def test_an_unexpected_exception_is_a_500_that_says_nothing(caplog):
    with caplog.at_level(logging.ERROR, logger="relat_server"):
        info = describe(KeyError("secret internals"))
    assert info.status == 500 and "secret" not in info.json()
    assert "secret internals" in caplog.text  # ... but the operator's log has it


def test_a_plain_value_error_is_not_a_client_error():
    assert describe(ValueError("a bug")).status == 500


# -- settings ---------------------------------------------------------------------------------------------------

def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("RELAT_API_KEYS", "k1, k2")
    monkeypatch.setenv("RELAT_MAX_QUEUE", "3")
    monkeypatch.setenv("RELAT_TARGETS", "q_proj,v_proj")
    monkeypatch.setenv("RELAT_STEPS", "4")
    settings = Settings()
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"] and settings.max_queue == 3
    assert "k1" not in repr(settings) + str(settings)  # a settings object that reaches a log shows no key
    assert settings.ttt_fields() == {"steps": 4, "targets": ("q_proj", "v_proj")}
    assert (settings.host, settings.port, settings.max_concurrency, settings.max_body_bytes) == \
        ("127.0.0.1", 8000, 8, 1 << 20)


def test_flags_override_the_environment_and_unset_flags_do_not(monkeypatch):
    monkeypatch.setenv("RELAT_PORT", "9000")
    monkeypatch.setenv("RELAT_MAX_QUEUE", "5")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    args = parser.parse_args(["--port", "9001", "--api-key", "a", "--api-key", "b", "--method", "latent",
                              "--no-adapter-during-answer", "--request-timeout", "2.5"])
    settings = settings_from_arguments(args)
    assert (settings.port, settings.max_queue) == (9001, 5)
    assert [key.get_secret_value() for key in settings.api_keys] == ["a", "b"]
    assert settings.ttt_fields() == {"method": "latent", "adapter_during_answer": False}
    assert settings.request_timeout == 2.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "magic"])


def test_an_invalid_ttt_default_fails_at_start_up():
    with pytest.raises(ValidationError, match="steps"):
        Settings(steps=1000)


def test_a_default_above_a_limit_fails_at_start_up(capsys):
    with pytest.raises(ValidationError, match="the default steps 20 is above max_steps 8"):
        Settings(steps=20, max_steps=8)
    assert main(["serve", "--latent-steps", "9", "--max-latent-steps", "8"]) == 2
    assert "the default latent_steps 9 is above max_latent_steps 8" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="max_steps"):
        Settings(max_steps=101)  # a limit is within the engine's own bound


def test_a_bad_agent_prompts_file_fails_at_start_up_before_the_model_loads(tmp_path, monkeypatch, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"roles": {"critic": "Criticise: {question}"}}))
    bad.write_text(json.dumps({"roles": {"critic": "Criticise the plan."}}))
    monkeypatch.setenv("RELAT_AGENT_PROMPTS", str(good))
    assert Settings().agent_prompts == good
    with pytest.raises(ValidationError, match="agent_prompts") as caught:
        Settings(agent_prompts=bad)
    assert "'critic' must be a string holding {question} exactly once" in str(caught.value)
    # `relat serve` exits at the settings (with no model anywhere to load, it would otherwise go on to fail there).
    assert main(["serve", "--agent-prompts", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "agent_prompts" in err and "cannot read agent prompts from" in err


# -- the client -------------------------------------------------------------------------------------------------

def test_sse_parser_skips_comments_and_joins_data_lines():
    parser = SSEParser()
    lines = [": ttt step 1/2 loss 3.0", "", "event: token", 'data: {"text":', 'data: "a"}', "", "data: [DONE]", ""]
    messages = [m for m in map(parser.feed, lines) if m is not None]
    assert messages == [("token", '{"text":\n"a"}'), ("message", "[DONE]")]
    assert json.loads(messages[0][1]) == {"text": "a"}


def test_the_client_types_agent_events_and_skips_events_it_does_not_know():
    latent = {"role": "planner", "label": "Planner", "kind": "latent", "prompt_tokens": 73, "latent_positions": 4,
              "completion_tokens": 0, "seconds": 0.12}
    assert _event("agent", json.dumps(latent)) == AgentTurn(**latent, text=None)
    text = {**latent, "kind": "text", "latent_positions": 0, "completion_tokens": 5, "text": "1. add", "new": 1}
    assert _event("agent", json.dumps(text)).text == "1. add"  # fields added later are ignored
    assert _event("future_event", '{"anything": 1}') is None


def test_the_client_package_needs_neither_the_engine_nor_the_server():
    code = ("import sys, relat_client; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('relat_core', 'relat_server', 'torch')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
