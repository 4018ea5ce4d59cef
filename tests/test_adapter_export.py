"""Adapter export (`return_adapter`): a request's trained adapter kept in PEFT's format, served as a zip by
GET /v1/adapters/{id} for a while, and written by `relat ask --save-adapter DIR`. PEFT loading it onto the same
base model must compute the logits the engine's adapted model computed."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from relat_server.adapters import AdapterStore
from relat_server.cli import main
from relat_server.settings import Settings
from safetensors.torch import load as load_safetensors
from transformers import AutoModelForCausalLM

from relat_core import Engine, InvalidParameter, Request, SamplingParams, TTTParams
from relat_core.export import CONFIG_FILE, WEIGHTS_FILE, adapter_bytes

from .conftest import build_tiny
from .server_support import (
    KEY,
    QUESTION,
    assert_error,
    data_events,
    one_torch_thread,
    ready_server,
    sse_lines,
)

SEED = 1  # the tiny model of the engine below; build_tiny(seed=SEED) rebuilds the same base for PEFT
# A few steps at a high learning rate: an adapter far enough from the base model that matching logits mean something.
TRAINED = TTTParams(steps=2, latent_steps=2, lr=0.05, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                    answer_context="question")
RELAT = {"steps": 2, "latent_steps": 2, "lr": 0.05, "rank": 4, "targets": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def engine(tokenizer):
    with one_torch_thread():
        yield Engine(build_tiny("qwen3", tokenizer, seed=SEED), max_rank=8)


def prompt_ids(engine: Engine, ttt: TTTParams = TRAINED) -> torch.Tensor:
    segments = engine.chat.segments(QUESTION, ttt.reconstruction_instruction, ttt.follow_up, latent=False)
    return torch.tensor([segments.prompt_ids])


def peft_logits(tokenizer, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a fresh copy of the base model with the exported adapter loaded by PEFT."""
    model = PeftModel.from_pretrained(build_tiny("qwen3", tokenizer, seed=SEED).model, str(folder))
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted_logits(engine: Engine, slot: int, ttt: TTTParams, ids: torch.Tensor) -> torch.Tensor:
    """The engine's own adapted forward: the model through the slot, bound as the engine binds an answering row.
    A released slot keeps its weights until the next request resets it, and nothing ran since."""
    with torch.no_grad(), engine.bank.bind([slot], [ttt.alpha / ttt.rank], ttt.targets, ttt.rank):
        return engine.model(input_ids=ids).logits


# -- the engine ---------------------------------------------------------------------------------------------------

def test_peft_loads_the_export_and_reproduces_the_adapted_logits(engine, tokenizer, tmp_path):
    result = engine.run(Request(QUESTION, TRAINED, SamplingParams(max_tokens=3, seed=5), return_adapter=True))
    export = result.adapter
    assert result.trace.aborted is None and export is not None
    layers = [layer for layer in engine.bank.layers if layer.kind in TRAINED.targets]
    in_out = sum(layer.A.shape[-1] + layer.B.shape[1] for layer in layers)
    assert export.nbytes == TRAINED.rank * in_out * 4 == adapter_bytes(engine.bank, TRAINED.rank, TRAINED.targets)
    assert result.trace.adapter == {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"],
                                    "bytes": export.nbytes}
    for layer in layers:  # the slot's rank-r slice, under PEFT's keys, as copies
        a = export.tensors[f"base_model.model.{layer.name}.lora_A.weight"]
        b = export.tensors[f"base_model.model.{layer.name}.lora_B.weight"]
        assert a.shape == (4, layer.A.shape[-1]) and b.shape == (layer.B.shape[1], 4)
        assert torch.equal(a, layer.A[0, :4].detach()) and torch.equal(b, layer.B[0, :, :4].detach())
        assert a.data_ptr() != layer.A.data_ptr()
    assert len(export.tensors) == 2 * len(layers)

    folder = export.save(tmp_path / "adapter")
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"] and config["lora_dropout"] == 0
    assert config["base_model_name_or_path"] == engine.base_model_name
    ids = prompt_ids(engine)
    ours = adapted_logits(engine, 0, TRAINED, ids)
    with torch.no_grad():
        base = engine.model(input_ids=ids).logits
    theirs = peft_logits(tokenizer, folder, ids)
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the model: the comparison is not vacuous
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_return_adapter_needs_a_trained_adapter(engine):
    for ttt in (TTTParams(method="direct"), TTTParams(method="latent"), TTTParams(steps=0)):
        with pytest.raises(InvalidParameter, match="return_adapter needs an adapter") as raised:
            engine.check(Request(QUESTION, ttt, return_adapter=True))
        assert raised.value.param == "return_adapter"
    assert engine.run(Request(QUESTION, TRAINED, SamplingParams(max_tokens=2))).adapter is None  # not asked for


def test_an_abandoned_update_exports_nothing(engine):
    """The non-finite guard abandoned the update: the base model answered, so there is no adapter to give."""
    lm_head = engine.model.get_output_embeddings()
    handle = lm_head.register_forward_hook(
        lambda module, args, output: output * float("nan") if torch.is_grad_enabled() else None)
    try:
        result = engine.run(Request(QUESTION, TRAINED, SamplingParams(max_tokens=2), return_adapter=True))
    finally:
        handle.remove()
    assert result.trace.aborted == "non-finite reconstruction loss at step 1"
    assert result.adapter is None and result.trace.adapter is None


def test_the_store_evicts_the_oldest_and_drops_expired_ones(engine):
    export = engine.run(Request(QUESTION, TRAINED, SamplingParams(max_tokens=1), return_adapter=True)).adapter
    now = [1000.0]
    store = AdapterStore(max_count=2, ttl=60, max_bytes=10 * export.nbytes, clock=lambda: now[0])
    first, second, third = (store.put(export, "a") for _ in range(3))
    assert store.get(first.id, "a") is None and store.get(second.id, "a") and store.get(third.id, "a")  # the count
    assert third.expires_at == 1060 and third.reference()["url"] == f"/v1/adapters/{third.id}"
    now[0] = 1060
    assert store.get(second.id, "a") is None and len(store) == 0  # expired
    small = AdapterStore(max_count=10, ttl=60, max_bytes=2 * export.nbytes, clock=lambda: now[0])
    kept = [small.put(export, "a") for _ in range(3)]
    assert [small.get(k.id, "a") is not None for k in kept] == [False, True, True]  # the bytes
    assert small.nbytes == 2 * export.nbytes


# -- the server ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(engine):
    with ready_server(engine, max_adapters=2, adapter_ttl=600, max_rank=8) as served:
        served.store = served.app.state.service.adapters
        yield served


def chat_body(**fields) -> dict:
    return {"messages": QUESTION, "max_completion_tokens": 3, "temperature": 0,
            "relat": {**RELAT, "return_adapter": True}, **fields}


def native_body(**fields) -> dict:
    return {"question": QUESTION[0]["content"], "max_tokens": 3, "temperature": 0, **RELAT, "return_adapter": True,
            **fields}


def fetch(server, adapter: dict) -> dict[str, bytes]:
    """The adapter's zip, checked against the trace's reference; its files by name."""
    assert adapter["url"] == f"/v1/adapters/{adapter['id']}" and adapter["expires_at"] > time.time()
    assert adapter["rank"] == 4 and adapter["targets"] == ["q_proj", "v_proj"]
    response = server.http.get(adapter["url"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    assert set(files) == {CONFIG_FILE, WEIGHTS_FILE}
    assert sum(t.numel() * 4 for t in load_safetensors(files[WEIGHTS_FILE]).values()) == adapter["bytes"]
    return files


def test_both_endpoints_streamed_or_not_name_the_adapter(server, engine, tokenizer, tmp_path):
    answer = server.http.post("/v1/chat/completions", json=chat_body())
    assert answer.status_code == 200, answer.text
    files = fetch(server, answer.json()["relat"]["adapter"])
    with server.http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
        chunks = data_events(sse_lines(response))
    fetch(server, next(c for c in chunks if isinstance(c, dict) and c.get("relat"))["relat"]["adapter"])

    assert fetch(server, server.http.post("/v1/relat", json=native_body()).json()["trace"]["adapter"])
    with server.http.stream("POST", "/v1/relat", json=native_body(stream=True)) as response:
        lines = list(sse_lines(response))
    done = json.loads(lines[lines.index("event: done") + 1][6:])
    fetch(server, done["trace"]["adapter"])

    # What the server served is the adapter the request trained: PEFT on the same base reproduces its logits.
    folder = tmp_path / "served"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    ttt = TTTParams(**{**RELAT, "targets": tuple(RELAT["targets"])})
    ids = prompt_ids(engine, ttt)
    served = peft_logits(tokenizer, folder, ids)
    tensors = load_safetensors(files[WEIGHTS_FILE])
    with torch.no_grad():  # the engine's forward through these weights, loaded into a slot
        for layer in engine.bank.layers:
            layer.A[0].zero_()
            layer.B[0].zero_()
            if layer.kind in ttt.targets:
                layer.A[0, :4] = tensors[f"base_model.model.{layer.name}.lora_A.weight"]
                layer.B[0, :, :4] = tensors[f"base_model.model.{layer.name}.lora_B.weight"]
    torch.testing.assert_close(served, adapted_logits(engine, 0, ttt, ids), rtol=0, atol=1e-5)


def test_the_oldest_adapter_is_evicted_and_an_expired_one_is_gone(server):
    ids = [server.http.post("/v1/relat", json=native_body()).json()["trace"]["adapter"]["id"] for _ in range(3)]
    assert_error(server.http.get(f"/v1/adapters/{ids[0]}"), 404, "adapter_not_found", "adapter_id")  # max_adapters 2
    assert server.http.get(f"/v1/adapters/{ids[1]}").status_code == 200
    assert server.http.get(f"/v1/adapters/{ids[2]}").status_code == 200
    clock = server.store.clock
    server.store.clock = lambda: time.time() + 601  # past adapter_ttl
    try:
        assert_error(server.http.get(f"/v1/adapters/{ids[2]}"), 404, "adapter_not_found")
    finally:
        server.store.clock = clock
    assert_error(server.http.get("/v1/adapters/adapter-unknown"), 404, "adapter_not_found")


def test_refusals(server):
    assert_error(httpx.get(f"{server.url}/v1/adapters/adapter-x"), 401, "invalid_api_key")
    for method in ("direct", "latent"):
        assert_error(server.http.post("/v1/chat/completions",
                                      json=chat_body(relat={"method": method, "return_adapter": True})),
                     400, "invalid_value", "relat.return_adapter")
        assert_error(server.http.post("/v1/relat", json=native_body(method=method)), 400, "invalid_value",
                     "return_adapter")
    store = server.store
    store.max_bytes = 100  # as --max-adapter-bytes 100: below what one export takes
    try:
        error = assert_error(server.http.post("/v1/relat", json=native_body()), 400, "invalid_value",
                             "return_adapter")
        assert "max_adapter_bytes" in error["message"]
    finally:
        store.max_bytes = Settings().max_adapter_bytes
    store.max_count = 0  # as --max-adapters 0: exports off
    try:
        error = assert_error(server.http.post("/v1/chat/completions", json=chat_body()), 400, "invalid_value",
                             "relat.return_adapter")
        assert "max_adapters is 0" in error["message"]
    finally:
        store.max_count = 2


# -- relat ask --save-adapter -----------------------------------------------------------------------------------

def test_ask_saves_an_adapter_peft_loads_locally_and_from_a_server(server, tokenizer, tmp_path, capsys):
    model = tmp_path / "model"
    build_tiny("qwen3", tokenizer, seed=SEED).model.save_pretrained(model)
    tokenizer.save_pretrained(model)
    flags = ["--steps", "2", "--latent-steps", "2", "--lr", "0.05", "--rank", "4", "--max-tokens", "2"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert main(["ask", "What is two plus two?", "--model", str(model), *flags, "--save-adapter", str(local)]) == 0
    assert "adapter saved to" in capsys.readouterr().err
    assert main(["ask", "What is two plus two?", "--url", server.url, "--api-key", KEY, *flags,
                 "--save-adapter", str(remote)]) == 0
    assert "adapter saved to" in capsys.readouterr().err
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model)(input_ids=ids).logits
    for folder in (local, remote):
        assert json.loads((folder / CONFIG_FILE).read_text())["r"] == 4
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(folder))
        with torch.no_grad():
            assert (peft(input_ids=ids).logits - base).abs().max() > 1e-3  # loaded, and it adapts the model

    assert main(["ask", "hi", "--model", str(model), "--method", "direct", "--save-adapter", str(local)]) == 2
    assert "return_adapter needs an adapter" in capsys.readouterr().err
    assert main(["ask", "hi", "--url", server.url, "--api-key", KEY, "--method", "latent",
                 "--save-adapter", str(remote)]) == 1
    assert "400" in capsys.readouterr().err
