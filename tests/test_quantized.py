"""`--weights int8|int4` (relat_core/quantized.py): the low-bit products and their input gradients against fp64
products on the dequantised weights, every method on a quantised tiny model, batched equal to alone within a
format, the base checksum over the stored low-bit tensors, int8's logits against fp32's, and `relat serve
--weights int8`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import torch
from relat_server.cli import main
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from relat_core import Engine, Request, SamplingParams, TTTParams, prepare
from relat_core.loading import weights_digest
from relat_core.quantized import (
    KERNEL_MAX_ROWS,
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8,
    kernels,
    quantize_int4,
    quantize_int8,
    quantize_linears,
)

from .conftest import TINY, save_tiny
from .server_support import chat, free_port, wait_for
from .test_batching import MIXED, assert_as_alone, drive

FORMATS = ("int8", "int4")
# The products accumulate in fp32 in another order than the fp64 reference: relative to the largest |value|.
PRODUCT_TOLERANCE = 1e-5


def tiny_model(tokenizer, weights: str, seed: int = 0, architecture: str = "qwen3"):
    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), **TINY,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if architecture == "qwen3":
        config.head_dim = 8
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return prepare(model, tokenizer, f"tiny-{architecture}-{weights}", "cpu", weights=weights)


@pytest.fixture(scope="module", params=FORMATS)
def quantized(request, tokenizer):
    return tiny_model(tokenizer, request.param)


def test_the_kernels_build_here():
    assert kernels() is not None  # without them every product dequantises: correct, but not what is measured


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_weights_dequantise_to_within_half_a_step_of_the_original(fmt):
    torch.manual_seed(0)
    weight = torch.randn(48, 96) * 0.05
    weight[3] = 0  # an all-zero row (int8) and group (int4) must not divide by zero
    if fmt == "int8":
        q, scale = quantize_int8(weight)
        restored = dequantize_int8(q, scale)
        step = scale[:, None].expand_as(weight)
    else:
        packed, scale, zero = quantize_int4(weight)
        assert packed.shape == (48, 48) and packed.dtype == torch.uint8
        restored = dequantize_int4(packed, scale, zero)
        step = scale.repeat_interleave(32, dim=1)
    assert torch.all((restored - weight).abs() <= step / 2 + 1e-7)
    assert torch.equal(restored[3], torch.zeros(96))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 17])  # the kernel (up to KERNEL_MAX_ROWS) and the dequantising path
def test_forward_and_input_gradient_are_those_of_the_dequantised_weight(fmt, rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 40, bias=True).requires_grad_(False)
    layer = QuantizedLinear(linear, fmt)
    reference = (dequantize_int8(layer.weight_q, layer.weight_scale) if fmt == "int8"
                 else dequantize_int4(layer.weight_q, layer.weight_scale, layer.weight_zero)).double()
    assert torch.allclose(layer.weight.double(), reference, rtol=0, atol=1e-7)  # the kernel's dequantisation
    x = torch.randn(2, rows, 96, requires_grad=True) if rows > 1 else torch.randn(1, 1, 96, requires_grad=True)
    y = layer(x)
    expected = x.detach().double() @ reference.t() + linear.bias.double()
    assert (y.double() - expected).abs().max() <= PRODUCT_TOLERANCE * expected.abs().max()
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    expected_dx = grad.double() @ reference
    assert (dx.double() - expected_dx).abs().max() <= PRODUCT_TOLERANCE * expected_dx.abs().max()
    assert not any(t.requires_grad for t in layer.buffers())


@pytest.mark.parametrize("inputs", [96, 40])  # 40: int8's loop tail (not a multiple of 16); int4 needs groups of 32
def test_kernels_equal_fp64_products_at_every_row_count(inputs):
    """The kernels take rows 8 at a time and the last 1-7 in a block of their own: every count up to 17, forward
    and input gradient, against fp64 products on the dequantised weight."""
    lib = kernels()
    torch.manual_seed(inputs)
    weight = torch.randn(24, inputs) * 0.05
    q, scale = quantize_int8(weight)
    formats = {"int8": ((q, scale), dequantize_int8(q, scale))}
    if inputs % 32 == 0:
        packed = quantize_int4(weight)
        formats["int4"] = (packed, dequantize_int4(*packed))
    for fmt, (stored, reference) in formats.items():
        forward, backward = getattr(lib, f"{fmt}_forward"), getattr(lib, f"{fmt}_backward")
        for rows in range(1, 18):
            x, dy = torch.randn(rows, inputs), torch.randn(rows, 24)
            expected = x.double() @ reference.double().t()
            assert (forward(x, *stored).double() - expected).abs().max() <= PRODUCT_TOLERANCE * expected.abs().max()
            expected_dx = dy.double() @ reference.double()
            assert ((backward(dy, *stored).double() - expected_dx).abs().max()
                    <= PRODUCT_TOLERANCE * expected_dx.abs().max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_layers_of_one_shape_share_the_scratch_matrix_without_mixing_their_products(fmt):
    """Past the kernels' rows each product dequantises into one scratch matrix per shape: a second layer's product
    must not change the first's result, and `weight` stays a tensor of its own."""
    torch.manual_seed(3)
    first, second = (QuantizedLinear(nn.Linear(64, 32, bias=False).requires_grad_(False), fmt) for _ in range(2))
    x = torch.randn(20, 64, requires_grad=True)  # 20 rows: the dequantising path, forward and backward
    y_first = first(x)
    y_second = second(x)
    for layer, y in ((first, y_first), (second, y_second)):
        expected = x.detach().double() @ layer.weight.double().t()
        assert (y.double() - expected).abs().max() <= PRODUCT_TOLERANCE * expected.abs().max()
    (dx,) = torch.autograd.grad(y_first.sum(), x)
    assert torch.allclose(dx.double(), first.weight.double().sum(0).expand(20, -1), atol=1e-5)
    weight = first.weight
    second(x.detach())
    assert torch.equal(weight, first.weight)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck_through_the_low_bit_product(fmt):
    """torch.autograd.gradcheck in fp32 (the kernels are fp32): finite differences of eps 1e-2 against the
    analytic input gradient, within atol 1e-2 and rtol 1e-2 (fp32 rounding over 96 terms)."""
    torch.manual_seed(1)
    layer = QuantizedLinear(nn.Linear(96, 24, bias=False).requires_grad_(False), fmt)
    for rows in (1, 5, max(KERNEL_MAX_ROWS[fmt].values()) + 3):
        x = torch.randn(rows, 96, requires_grad=True)
        assert torch.autograd.gradcheck(layer, (x,), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_every_linear_but_the_head_is_stored_low_bit(quantized):
    model = quantized.model
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    low = [m for m in layers if isinstance(m, QuantizedLinear)]
    assert len(low) == len(layers) - 1 and not isinstance(model.get_output_embeddings(), QuantizedLinear)
    assert not any(name.endswith(".weight") and "layers." in name and ("proj" in name)
                   for name in model.state_dict())  # no fp32 copy of a quantised layer is kept
    assert all(isinstance(m.weight_q, torch.Tensor) for m in low)


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_tensor_left_shares_memory_with_the_loaded_checkpoint(tokenizer, fmt):
    """transformers loads safetensors as views of one memory-mapped file: a single fp32 tensor left on it (the
    embeddings, a norm) would keep every quantised layer's fp32 pages resident. After quantising, each parameter
    and buffer has storage of its own, equal in value, and tied weights stay tied."""
    config = AutoConfig.for_model("qwen3", vocab_size=len(tokenizer), **{**TINY, "tie_word_embeddings": True},
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.head_dim = 8
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).requires_grad_(False)
    loaded = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    held = list(model.state_dict().values())  # the checkpoint's tensors, kept alive: their memory is not reused
    checkpoint = {tensor.untyped_storage().data_ptr() for tensor in held}
    quantize_linears(model, fmt)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert tensor.untyped_storage().data_ptr() not in checkpoint, name
        if name in loaded:
            assert torch.equal(tensor, loaded[name]), name


@pytest.mark.slow
def test_int4_holds_the_embedded_models_own_q4_1_weights_exactly(embedded_folder):
    """The embedded SmolLM2 ships as a Q4_1 GGUF: each block of 32 weights is d * q + m with q in 0..15, the grid
    int4's groups of 32 (scale and zero per group) store. So int4 loses nothing on it: every weight of the decoder
    stack comes back bit for bit, and int8 (one scale per row) does not."""
    model = AutoModelForCausalLM.from_pretrained(embedded_folder, dtype=torch.float32)
    linears = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name]
    assert len(linears) == 7 * model.config.num_hidden_layers
    int8_exact = True
    for layer in linears:
        weight = layer.weight.detach()
        assert torch.equal(dequantize_int4(*quantize_int4(weight)), weight)
        int8_exact &= torch.equal(dequantize_int8(*quantize_int8(weight)), weight)
    assert not int8_exact


def snapped_to_int4(tokenizer):
    """A tiny model whose decoder-stack weights lie on a 4-bit grid with groups of 32, as a Q4_1 checkpoint's do:
    q * 2^-6 - 2^-3 with q in 0..15, each group holding both ends (so its scale and zero are exact in fp32)."""
    model = tiny_model(tokenizer, "fp32").model
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is nn.Linear and ".layers." in name:
                rows, columns = module.weight.shape
                q = torch.randint(0, 16, (rows, columns // 32, 32), generator=generator).float()
                q[..., 0], q[..., 1] = 0, 15
                module.weight.copy_((q * 2**-6 - 2**-3).reshape(rows, columns))
    return model


def test_auto_stores_int4_only_where_it_holds_every_weight_exactly(tokenizer):
    assert tiny_model(tokenizer, "auto").weights == "fp32"  # random fp32 weights: int4 would round them
    random_model = tiny_model(tokenizer, "auto").model
    assert not any(isinstance(m, QuantizedLinear) for m in random_model.modules())

    model = snapped_to_int4(tokenizer)
    before = {name: m.weight.clone() for name, m in model.named_modules()
              if type(m) is nn.Linear and ".layers." in name}
    assert quantize_linears(model, "auto") == "int4"
    for name, weight in before.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedLinear) and layer.format == "int4"
        assert torch.equal(layer.weight, weight)

    one_off = snapped_to_int4(tokenizer)
    with torch.no_grad():
        one_off.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one weight off the grid: all stay fp32
    assert quantize_linears(one_off, "auto") == "fp32"
    assert not any(isinstance(m, QuantizedLinear) for m in one_off.modules())


def test_auto_keeps_fp32_where_low_bit_formats_are_refused(tokenizer):
    model = snapped_to_int4(tokenizer).to(torch.bfloat16)
    assert quantize_linears(model, "auto") == "fp32"
    with pytest.raises(ValueError, match="fp32 models only"):
        quantize_linears(model, "int4")


REQUESTS = {
    "direct": Request([{"role": "user", "content": "Name a metal."}], TTTParams(method="direct"),
                      SamplingParams(max_tokens=4)),
    "latent": Request([{"role": "user", "content": "Name a metal."}], TTTParams(method="latent", latent_steps=3),
                      SamplingParams(max_tokens=4)),
    "relat": Request([{"role": "user", "content": "Name a metal."}],
                     TTTParams(latent_steps=3, steps=2, lr=1e-2, gate="none"), SamplingParams(max_tokens=4)),
    "relat-agents": Request([{"role": "user", "content": "Name a metal."}],
                            TTTParams(latent_steps=2, steps=2, lr=1e-2, gate="none", agents="sequential"),
                            SamplingParams(max_tokens=4)),
}


def test_every_method_runs_and_leaves_the_stored_weights_as_they_were(quantized):
    engine = Engine(quantized)
    before = weights_digest(quantized.model)
    for name, request in REQUESTS.items():
        result = engine.run(request)
        assert result.token_ids, name
        if request.ttt.method == "relat":
            assert len(result.trace.steps) == 2 and all(s["grad_norm"] > 0 for s in result.trace.steps), name
    assert weights_digest(quantized.model) == before


def test_batched_equals_alone_within_a_format(quantized):
    engine = Engine(quantized, num_slots=4)
    outcomes = drive(engine, MIXED)
    for request_id, request in MIXED.items():
        assert_as_alone(engine, request, outcomes[request_id])


def test_the_checksum_covers_the_stored_low_bit_tensors(tokenizer):
    loaded = tiny_model(tokenizer, "int8")
    digest = weights_digest(loaded.model)
    assert digest != weights_digest(tiny_model(tokenizer, "fp32").model)
    layer = next(m for m in loaded.model.modules() if isinstance(m, QuantizedLinear))
    layer.weight_q[0, 0] += 1
    assert weights_digest(loaded.model) != digest


def test_int8_logits_are_close_to_fp32s(tokenizer):
    """The same random weights in fp32 and int8: logits over a prompt within 2% of the largest |logit| (int8's
    rounding is at most half a step, 1/254 of a row's largest weight); int4 within 30% (a step is 1/15 of a group's
    range: on Gaussian random weights, about a third of their standard deviation; 19% measured), and int8 nearer."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Which planet is red?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        full = tiny_model(tokenizer, "fp32", seed=5).model(ids).logits
        errors = {}
        for fmt, tolerance in (("int8", 0.02), ("int4", 0.3)):
            low = tiny_model(tokenizer, fmt, seed=5).model(ids).logits
            errors[fmt] = (low - full).abs().max()
            assert errors[fmt] <= tolerance * full.abs().max(), fmt
            assert not torch.equal(low, full)
        assert errors["int8"] < errors["int4"]


def test_relat_serve_with_int8_weights_answers(tmp_path_factory, tokenizer, tmp_path):
    model_dir = save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen3", tokenizer, seed=3)
    port = free_port()
    env = {**os.environ, "RELAT_TORCH_THREADS": "1", "RELAT_DEVICE": "cpu", "RELAT_SERVED_MODEL_NAME": "tiny"}
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "relat_server", "serve", "--model", str(model_dir),
                                "--port", str(port), "--weights", "int8"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, "relat serve exited early"
        try:
            return httpx.get(f"{url}/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "relat serve --weights int8 to become ready", limit=300)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=300,
                           json=chat("tiny", relat={"latent_steps": 2, "steps": 1, "gate": "none"}))
        assert reply.status_code == 200 and len(reply.json()["relat"]["steps"]) == 1
    finally:
        process.terminate()
        process.wait(60)
        log.seek(0)
        output = log.read()
        log.close()
    assert "stored in int8" in output


def test_relat_serve_refuses_an_unknown_weights_format(capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's choices, read from the setting's Literal
        main(["serve", "--weights", "int3"])
    assert exited.value.code == 2
    assert "--weights" in capsys.readouterr().err
