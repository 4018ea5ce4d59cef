"""A Huginn-layout folder served through both endpoints with its depth options, and those options refused with a
400 naming them on a model that is not recurrent (through HTTP, as clients meet them)."""

from __future__ import annotations

import httpx
import pytest
from relat_server.settings import Settings

from relat_core import Engine, load_model

from .conftest import build_tiny
from .huginn_support import published_tensors, write_checkpoint
from .server_support import (
    KEY,
    QUESTION,
    assert_error,
    chat,
    data_events,
    one_torch_thread,
    ready_server,
    serve_in_thread,
    sse_lines,
    wait_for,
)

DEPTH = {"num_steps": 3, "exit_criterion": "kl", "exit_threshold": 1e9, "init_scale": 0.0}  # one recurrence each


@pytest.fixture(scope="module")
def huginn_server(tmp_path_factory, tokenizer):
    folder = write_checkpoint(tmp_path_factory.mktemp("raven"), published_tensors(len(tokenizer)), len(tokenizer))
    tokenizer.save_pretrained(folder)
    with one_torch_thread(), ready_server(Engine(load_model(str(folder), device="cpu"), num_slots=2, max_rank=8),
                                          max_concurrency=2, max_num_steps=6) as served:
        yield served


@pytest.fixture(scope="module")
def qwen_server(tokenizer):
    with one_torch_thread(), ready_server(Engine(build_tiny("qwen3", tokenizer, seed=1))) as served:
        yield served


def test_models_names_the_family_and_its_default_depth(huginn_server, qwen_server):
    card = huginn_server.http.get("/v1/models").json()["data"][0]
    assert (card["family"], card["num_steps"], card["max_num_steps"]) == ("huginn", 4, 6)  # the tiny config: 4
    assert card["max_model_len"] == 256  # its block_size
    other = qwen_server.http.get("/v1/models").json()["data"][0]
    assert other["family"] == "qwen3" and other["num_steps"] is None and other["max_num_steps"] is None


def test_both_endpoints_take_the_depth_options(huginn_server):
    body = chat(huginn_server, max_completion_tokens=3, relat={"method": "relat", "steps": 1, "latent_steps": 2,
                                                                 "cache": False, **DEPTH}, ignore_eos=True)
    trace = huginn_server.http.post("/v1/chat/completions", json=body).json()["relat"]
    assert trace["recurrences"] == {"mean": 1.0, "min": 1, "max": 1, "positions": 2}
    assert {name: trace["options"][name] for name in DEPTH} == DEPTH and trace["options"]["backprop_depth"] == 2
    assert trace["options"]["targets"] == ["Wqkv", "attn.proj"] and len(trace["steps"]) == 1

    native = {"model": huginn_server.model, "question": QUESTION[0]["content"], "method": "latent", "latent_steps": 2,
              "max_tokens": 3, "ignore_eos": True, "num_steps": 5, "stream": True}
    with huginn_server.http.stream("POST", "/v1/relat", json=native) as response:
        assert response.status_code == 200
        events = data_events(sse_lines(response))
    final = next(event for event in events if isinstance(event, dict) and event.get("object") == "relat.result")
    assert final["trace"]["recurrences"]["max"] == 5 and final["trace"]["options"]["num_steps"] == 5


def test_depth_past_the_servers_maximum_is_refused(huginn_server):
    body = chat(huginn_server, relat={"num_steps": 7})
    assert_error(huginn_server.http.post("/v1/chat/completions", json=body), 400, param="relat.num_steps")
    body = chat(huginn_server, relat={"targets": ["q_proj"]})  # a Llama layer name: not on this model
    error = assert_error(huginn_server.http.post("/v1/chat/completions", json=body), 400, param="relat.targets")
    assert "Wqkv" in error["message"]


@pytest.mark.parametrize(("option", "value"), [("num_steps", 4), ("init_scale", 0.5), ("exit_criterion", "kl"),
                                               ("backprop_depth", 2)])
def test_huginn_options_on_another_model_are_refused_naming_them(qwen_server, option, value):
    body = chat(qwen_server, relat={option: value})
    error = assert_error(qwen_server.http.post("/v1/chat/completions", json=body), 400, param=f"relat.{option}")
    assert "recurrent-depth" in error["message"]
    native = {"model": qwen_server.model, "question": QUESTION[0]["content"], option: value}
    assert_error(httpx.post(f"{qwen_server.url}/v1/relat", json=native, headers={"Authorization": f"Bearer {KEY}"}),
                 400, param=option)


def test_a_default_the_model_cannot_take_stops_the_start_up(tokenizer):
    """--num-steps on a model that is not recurrent would fail every request: the server fails at load instead."""
    engine = Engine(build_tiny("qwen3", tokenizer, seed=2))
    with serve_in_thread(Settings(api_keys=[KEY], num_steps=4), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/health").status_code == 503, "the failed load")
        assert httpx.get(f"{served.url}/ready").status_code == 503
