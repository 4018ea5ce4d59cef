"""The linear layers on oneDNN-packed weights (relat_core/packing.py): the same products as torch's linear within
fp32 rounding, the input's gradient as torch's, a stale copy never read, and an engine on a packed model training
and answering as on the plain one, its base weights unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from relat_core import Engine, Request, SamplingParams, TTTParams, packing
from relat_core.loading import weights_digest
from relat_core.packing import PackedForward, pack_linears, packing_available
from relat_core.packing import _packed_linear as packed_product

from .conftest import build_tiny

pytestmark = pytest.mark.skipif(not packing_available(nn.Linear(2, 2)), reason="torch built without oneDNN")

# fp32 products of a few hundred terms summed in another order (oneDNN's blocks, MKL's) differ by a few ulps of
# the sum: ~1e-6 relative to the largest terms here (measured below 3e-7 on a 2-core AMD EPYC).
CLOSE = dict(rtol=1e-5, atol=1e-5)


def packed_linear(in_features: int, out_features: int, bias: bool, seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    """A frozen layer and its packed twin (the same weights)."""
    torch.manual_seed(seed)
    plain = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    packed = copy.deepcopy(plain)
    assert pack_linears(packed) == 1
    return plain, packed


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 37])
def test_the_packed_product_is_torchs_linear(rows, bias):
    plain, packed = packed_linear(96, 160, bias)
    x = torch.randn(2, rows, 96)
    torch.testing.assert_close(packed(x), plain(x), **CLOSE)
    # Rows compute what they compute among others (oneDNN's rows do not depend on the row count here); a single
    # row is torch's product.
    flat = x.reshape(-1, 96)
    together = packed(flat)
    in_pairs = torch.cat([packed(flat[i:i + 2]) for i in range(0, len(flat), 2)])
    torch.testing.assert_close(in_pairs, together, rtol=1e-6, atol=1e-6)
    alone = torch.cat([packed(row[None]) for row in flat])
    assert torch.equal(alone, torch.cat([plain(row[None]) for row in flat]))


def test_a_single_row_is_packed_only_for_a_weight_as_wide_as_an_lm_head(monkeypatch):
    narrow, wide = nn.Linear(64, 96).requires_grad_(False), nn.Linear(64, 16_384).requires_grad_(False)
    pack_linears(narrow)
    pack_linears(wide)
    calls = []

    def counting(x, packed, bias):
        calls.append(x.shape[0])
        return packed_product(x, packed, bias)

    monkeypatch.setattr(packing, "_packed_linear", counting)
    row, rows = torch.randn(1, 64), torch.randn(2, 64)
    torch.testing.assert_close(narrow(row), nn.functional.linear(row, narrow.weight, narrow.bias), **CLOSE)
    narrow(rows)
    wide(row)
    assert calls == [2, 1]  # the narrow layer's single row went to torch's linear


def test_the_gradient_reaches_the_input_and_not_the_frozen_weight():
    plain, packed = packed_linear(48, 80, bias=True)
    x = torch.randn(5, 48, requires_grad=True)
    upstream = torch.randn(5, 80)
    (packed(x) * upstream).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (plain(x) * upstream).sum().backward()
    torch.testing.assert_close(got, x.grad, **CLOSE)
    assert packed.weight.grad is None and packed.bias.grad is None


def test_a_weight_changed_in_place_moved_or_cast_is_packed_again():
    plain, packed = packed_linear(32, 16, bias=False)
    x = torch.randn(4, 32)
    before = packed(x)
    with torch.no_grad():
        packed.weight.mul_(2)
        plain.weight.mul_(2)
    torch.testing.assert_close(packed(x), plain(x), **CLOSE)
    torch.testing.assert_close(packed(x), 2 * before, **CLOSE)
    # A cast to bf16 falls back to torch's linear; cast back (new storage), the layer packs the rounded weights.
    packed.to(torch.bfloat16)
    plain.to(torch.bfloat16)
    assert torch.equal(packed(x.bfloat16()), plain(x.bfloat16()))
    packed.float()
    plain.float()
    torch.testing.assert_close(packed(x), plain(x), **CLOSE)


def test_a_trainable_weight_and_other_dtypes_use_torchs_linear():
    layer = nn.Linear(8, 8)
    assert pack_linears(layer) == 0  # trainable: nothing to pack
    assert "forward" not in layer.__dict__
    assert not packing_available(nn.Linear(8, 8).bfloat16())
    _, packed = packed_linear(8, 8, bias=False)
    packed.weight.requires_grad_(True)  # unfrozen after packing: its gradient must come, so torch computes it
    packed(torch.randn(2, 8)).sum().backward()
    assert packed.weight.grad is not None


def test_packing_twice_and_copying_a_packed_model(tiny_qwen3):
    model = tiny_qwen3.model
    forwards = {name: module.forward for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert forwards and all(isinstance(f, PackedForward) for f in forwards.values())  # prepare packed them all
    assert pack_linears(model) == len(forwards)
    assert all(module.forward is forwards[name] for name, module in model.named_modules() if name in forwards)
    twin = copy.deepcopy(model)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)


REQUESTS = {
    "relat": Request([{"role": "user", "content": "Which planet is known as the red planet?"}],
                     TTTParams(latent_steps=3, steps=3, lr=1e-2, rank=8, follow_up="bridge",
                               adapter_during_answer=True), SamplingParams(max_tokens=8, seed=1)),
    "direct": Request([{"role": "user", "content": "Name a metal."}], TTTParams(method="direct"),
                      SamplingParams(max_tokens=6)),
}


@pytest.mark.parametrize("architecture", ["qwen3", "qwen2"])  # qwen2's q/k/v have biases
def test_an_engine_on_packed_weights_trains_and_answers_as_on_plain_ones(architecture, tokenizer):
    packed = build_tiny(architecture, tokenizer)
    plain = build_tiny(architecture, tokenizer, pack_weights=False)
    assert not any("forward" in m.__dict__ for m in plain.model.modules())
    assert weights_digest(packed.model) == weights_digest(plain.model)  # one more copy, none of the module's state
    digest = weights_digest(packed.model)
    engines = Engine(packed, max_rank=8, num_slots=2), Engine(plain, max_rank=8, num_slots=2)
    for request in REQUESTS.values():
        got, expected = (engine.run(request) for engine in engines)
        assert [s["loss"] for s in got.trace.steps] == pytest.approx([s["loss"] for s in expected.trace.steps],
                                                                     rel=1e-4, abs=1e-5)
        assert got.token_ids == expected.token_ids
    assert weights_digest(packed.model) == digest
