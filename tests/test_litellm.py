"""relat behind LiteLLM, the gateway many users already run: completions sent through LiteLLM's OpenAI-compatible
provider (`openai/<model>`) to a real server on a tiny random Qwen3, and deploy/litellm/config.yaml routed by
LiteLLM's Router, the proxy's routing core. Answers of a random model are gibberish; the tests never read them.

LiteLLM runs offline here. At import it fetches a model cost map from GitHub unless told to use its bundled copy,
and `LITELLM_OFFLINE_MODE` turns off its other fetches; tiktoken's encodings come bundled with LiteLLM. An audit
hook makes that a check: while this module imports LiteLLM or runs a test, any lookup of, or connection to, a host
other than the loopback fails at once (no hang) and is recorded, and a record fails the test.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from pathlib import Path

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # read before `import litellm`
os.environ["LITELLM_OFFLINE_MODE"] = "true"

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
NETWORK_GUARD = {"on": False, "attempts": []}


def _refuse_outside_loopback(event: str, args: tuple) -> None:
    """An audit hook (it stays for the process, so it acts only while NETWORK_GUARD is on)."""
    if not NETWORK_GUARD["on"]:
        return
    if event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):  # AF_INET(6); a Unix socket's path is local
        host = args[1][0]
    else:
        return
    if host is not None and host not in LOOPBACK:
        NETWORK_GUARD["attempts"].append((event, host))
        raise OSError(f"tests/test_litellm.py: no network here ({event} {host})")


sys.addaudithook(_refuse_outside_loopback)
NETWORK_GUARD["on"] = True
try:
    import litellm  # noqa: E402
finally:
    NETWORK_GUARD["on"] = False
IMPORT_ATTEMPTS = list(NETWORK_GUARD["attempts"])

import pytest  # noqa: E402
import yaml  # noqa: E402
from litellm.types.router import Deployment  # noqa: E402

from relat_core import Engine  # noqa: E402
from relat_core.loading import EMBEDDED_MODEL  # noqa: E402

from .conftest import build_tiny  # noqa: E402
from .server_support import KEY, QUESTION, one_torch_thread, ready_server  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "litellm" / "config.yaml"
# LiteLLM's own TypedDicts, built into pydantic models on first use, warn about pydantic's reading of `ReadOnly`.
pytestmark = pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning")


@pytest.fixture(autouse=True)
def offline_litellm():
    """No callbacks, no debug banners, and the network guard on for the test's duration."""
    saved = (litellm.suppress_debug_info, litellm.callbacks, litellm.success_callback, litellm.failure_callback)
    litellm.suppress_debug_info = True
    litellm.callbacks, litellm.success_callback, litellm.failure_callback = [], [], []
    NETWORK_GUARD["attempts"].clear()
    NETWORK_GUARD["on"] = True
    try:
        yield
    finally:
        NETWORK_GUARD["on"] = False
        (litellm.suppress_debug_info, litellm.callbacks, litellm.success_callback, litellm.failure_callback) = saved
    assert NETWORK_GUARD["attempts"] == [], "LiteLLM tried to reach the network"


@pytest.fixture(scope="module")
def engine(tokenizer):
    with one_torch_thread():
        yield Engine(build_tiny("qwen3", tokenizer, seed=1))


@pytest.fixture(scope="module")
def server(engine):
    with ready_server(engine) as served:
        yield served


def call(server, **fields) -> dict:
    """litellm.completion's arguments for the test server: the documented way to reach an OpenAI-compatible one."""
    return {"model": f"openai/{server.model}", "api_base": f"{server.url}/v1", "api_key": KEY, "messages": QUESTION,
            "max_tokens": 8, "temperature": 0, "seed": 3, "num_retries": 0, "timeout": 120, **fields}


def assert_trace(trace: dict, steps: int, latent_steps: int) -> None:
    """The server's `relat` trace shows the options LiteLLM passed on, and that the engine ran them."""
    assert trace["method"] == "relat"
    assert trace["options"]["steps"] == steps and trace["options"]["latent_steps"] == latent_steps
    assert trace["latent_steps"] == latent_steps
    assert [record["step"] for record in trace["steps"]] == list(range(1, steps + 1))


def test_litellm_imported_offline():
    assert IMPORT_ATTEMPTS == []
    assert litellm.model_cost  # the bundled cost map, loaded without a fetch


def test_completion_keeps_the_relat_trace(server):
    response = litellm.completion(**call(server), extra_body={"relat": {"steps": 3, "latent_steps": 2}})
    content = response.choices[0].message.content
    assert isinstance(content, str) and content
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert response.usage.completion_tokens >= 1
    # LiteLLM keeps a response's unknown fields: the trace is an attribute, and in model_extra and model_dump().
    assert response.relat == response.model_extra["relat"] == response.model_dump()["relat"]
    assert_trace(response.relat, steps=3, latent_steps=2)


def test_stream_joins_to_the_same_answer_and_ends_with_the_trace(server):
    options = {"relat": {"steps": 2, "latent_steps": 3}}
    whole = litellm.completion(**call(server), extra_body=options)
    chunks = list(litellm.completion(**call(server), stream=True, extra_body=options))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text and text == whole.choices[0].message.content
    traces = [chunk.relat for chunk in chunks if getattr(chunk, "relat", None)]
    assert len(traces) == 1 and chunks[-1].relat == traces[0]  # on the last chunk, as relat sends it
    assert_trace(traces[0], steps=2, latent_steps=3)


def test_async_stream(server):
    async def stream() -> tuple[str, list]:
        response = await litellm.acompletion(**call(server), stream=True,
                                             extra_body={"relat": {"steps": 1, "latent_steps": 2}})
        chunks = [chunk async for chunk in response]
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices), chunks

    text, chunks = asyncio.run(stream())
    assert text
    assert_trace(chunks[-1].relat, steps=1, latent_steps=2)


def test_errors_map_to_litellm_exceptions(server):
    with pytest.raises(litellm.AuthenticationError) as wrong_key:
        litellm.completion(**call(server, api_key="sk-wrong"))
    assert wrong_key.value.status_code == 401
    with pytest.raises(litellm.BadRequestError) as out_of_range:
        litellm.completion(**call(server), extra_body={"relat": {"steps": 10**6}})
    assert out_of_range.value.status_code == 400 and "relat.steps" in str(out_of_range.value)


def test_proxy_config_routes_to_relat(server, monkeypatch):
    """deploy/litellm/config.yaml as written, then through LiteLLM's Router with the test server as relat."""
    config = yaml.safe_load(CONFIG.read_text())
    entries = {entry["model_name"]: entry for entry in config["model_list"]}
    assert set(entries) == {"relat", "relat-deep"}
    for entry in entries.values():
        Deployment(**entry)  # LiteLLM's own model of a model_list entry
        params = entry["litellm_params"]
        assert params["model"] == f"openai/{EMBEDDED_MODEL}"
        assert params["api_base"] == "http://relat:8000/v1"
        assert params["api_key"] == "os.environ/RELAT_API_KEY"
    assert entries["relat-deep"]["litellm_params"]["extra_body"] == {"relat": {"steps": 5, "latent_steps": 16}}

    monkeypatch.setenv("RELAT_API_KEY", KEY)
    model_list = copy.deepcopy(config["model_list"])
    for entry in model_list:
        params = entry["litellm_params"]
        params["api_key"] = litellm.get_secret(params["api_key"])  # as the proxy resolves `os.environ/` values
        params["api_base"] = f"{server.url}/v1"
        params["model"] = f"openai/{server.model}"
    router = litellm.Router(model_list=model_list, num_retries=0)
    ask = {"messages": QUESTION, "max_tokens": 4, "temperature": 0}

    # Options from the client: a body field `relat` reaches the Router (as the proxy passes it) as a keyword.
    assert_trace(router.completion(model="relat", **ask, relat={"steps": 2, "latent_steps": 1}).relat, 2, 1)
    # Options fixed by the model entry.
    assert_trace(router.completion(model="relat-deep", **ask).relat, 5, 16)
    # A client's own `relat` object replaces the entry's whole: what it leaves out takes relat's defaults.
    default_latent_steps = router.completion(model="relat", **ask).relat["options"]["latent_steps"]
    assert_trace(router.completion(model="relat-deep", **ask, extra_body={"relat": {"steps": 1}}).relat,
                 1, default_latent_steps)
