"""relat_client (sync and async) and `relat ask --url` against a real server with a tiny model."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
import torch
from relat_client import AsyncRelatClient, Done, RelatClient, RelatError, Token, TrainStep
from relat_server.cli import main
from relat_server.settings import Settings

from relat_core import Engine

from .conftest import build_tiny
from .server_support import KEY, SLOW, serve_in_thread, wait_for

QUESTION = "Why is the sky blue?"
OPTIONS = {"steps": 3, "latent_steps": 2, "max_tokens": 6, "temperature": 0, "seed": 5}


@pytest.fixture(scope="module")
def server(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(build_tiny("qwen3", tokenizer, seed=4))
    with serve_in_thread(Settings(api_keys=[KEY]), lambda: engine) as served:
        wait_for(lambda: httpx.get(f"{served.url}/ready").status_code == 200, "readiness")
        yield SimpleNamespace(url=served.url, model=engine.name)
    torch.set_num_threads(threads)


def check_events(events: list, result: dict) -> None:
    steps = [e for e in events if isinstance(e, TrainStep)]
    assert [s.step for s in steps] == [1, 2, 3] and all(s.steps == 3 for s in steps)
    assert [s.loss for s in steps] == [s["loss"] for s in result["trace"]["steps"]]
    assert isinstance(events[-1], Done) and events[-1].result["answer"] == result["answer"]
    assert "".join(e.text for e in events if isinstance(e, Token)) == result["answer"]
    assert events.index(steps[-1]) < min((i for i, e in enumerate(events) if isinstance(e, Token)), default=len(events))


def test_sync_client_asks_and_streams(server):
    with RelatClient(server.url, api_key=KEY) as client:
        assert client.ready() and client.models() == [server.model]
        result = client.ask(QUESTION, **OPTIONS)
        assert result["usage"]["completion_tokens"] >= 1 and result["trace"]["method"] == "relat"
        check_events(list(client.stream(QUESTION, **OPTIONS)), result)


def test_async_client_asks_and_streams(server):
    async def run():
        async with AsyncRelatClient(server.url, api_key=KEY) as client:
            assert await client.ready() and await client.models() == [server.model]
            result = await client.ask(QUESTION, **OPTIONS)
            return result, [event async for event in client.stream(QUESTION, **OPTIONS)]

    result, events = asyncio.run(run())
    check_events(events, result)


def test_client_errors_carry_the_servers_fields(server):
    with RelatClient(server.url, api_key="sk-wrong") as client, pytest.raises(RelatError) as caught:
        client.ask(QUESTION)
    assert caught.value.status == 401 and caught.value.code == "invalid_api_key" and caught.value.request_id
    with RelatClient(server.url, api_key=KEY) as client:
        with pytest.raises(RelatError) as caught:
            list(client.stream(QUESTION, steps=1000))
        assert (caught.value.status, caught.value.param) == (400, "steps")
        with pytest.raises(RelatError) as caught:  # after the 200: an error event
            list(client.stream(QUESTION, **SLOW, timeout=0.3))
        assert (caught.value.status, caught.value.code) == (504, "deadline_exceeded")


def test_relat_ask_url_prints_the_answer_and_the_trace(server, capsys):
    with RelatClient(server.url, api_key=KEY) as client:
        expected = client.ask(QUESTION, **OPTIONS)
    flags = ["--url", server.url, "--api-key", KEY, "--steps", "3", "--latent-steps", "2", "--max-tokens", "6",
             "--seed", "5"]
    assert main(["ask", *flags, QUESTION]) == 0
    output = capsys.readouterr()
    assert output.out.rstrip("\n") == expected["answer"]
    assert "reconstruction loss" in output.err and "step 3:" in output.err
    assert main(["ask", *flags, "--json", QUESTION]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["answer"] == expected["answer"] and len(printed["trace"]["steps"]) == 3


def test_relat_ask_url_reports_server_errors(server, capsys):
    assert main(["ask", "--url", server.url, "--api-key", "sk-wrong", QUESTION]) == 1
    assert "401" in capsys.readouterr().err
