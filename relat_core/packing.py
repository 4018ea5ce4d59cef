"""The frozen linear layers on CPU through oneDNN, with their weights prepacked once at start-up.

Why: on this project's CPUs (AMD EPYC, AVX2), torch's fp32 `linear` goes to MKL's sgemm, which is slow for the
few-row products that dominate relat: a latent step or a decoding step of a batch of B requests multiplies B rows
by every weight matrix. oneDNN with the weight reordered once into its blocked layout runs the MLP's 8-row
products 1.8x faster and the LM head 1.7-3.6x faster (the small attention weights at 1-8 rows are slower; a batch
of 8 requests runs 1.2-1.3x faster in all: bench/RESULTS.md, section 14). A product of a single row, where packing
loses on all but the LM head, stays on torch's linear (section 15). Its rows of two or more also came out the same
whatever the number of rows sharing the product, in every shape tried here (tests/test_packing.py holds them to
1e-6), where MKL's rows differ in the last bits between 1-7 rows and 8 or more.

What it costs: one more copy of every linear weight in memory (the layout is oneDNN's, not torch's), made once in
`prepare`; the model's modules, names, parameters and state dict stay as loaded (the checksum of the base weights
is unchanged), and the adapter hooks (lora.py) still see every call. The gradient with respect to the input, which
relat's training backpropagates through the frozen layers, is `grad @ W` through torch as before.

Where it applies: fp32 weights on the CPU with oneDNN available; anything else (a GPU, bf16, a weight that trains)
keeps torch's `linear`. A weight changed in place, moved or cast after packing is packed again before its next
use, so a stale copy is never read.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

# oneDNN and ideep (torch's layer over it) each keep a primitive per product shape, 1,024 of each by default, about
# 0.4 MB apiece here: a server meets new row counts with every batch, and its memory crept by hundreds of MB
# (tests/test_soak.py caught it). Both read their capacity once, at first use, so it is set here, before anything
# in relat runs oneDNN; a value already in the environment wins. 64 holds the shapes of a batch's training step and
# decoding many times over (bench/RESULTS.md, section 14: no slower than the unbounded cache).
for _variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_variable, "64")

# The row count oneDNN tunes its blocked layout for; any row count runs on it (8: the server's default batch).
_PACKED_FOR_ROWS = 8
# A one-row product (a request alone: its latent and decoding steps) is faster on torch's own linear, except for
# a weight this wide, the LM head's: on the embedded model a whole one-row decoding step took 69-84 ms against
# 80-95 ms all packed and 91-105 ms all plain (bench/RESULTS.md, section 15). At 8 rows packing every layer wins.
_ONE_ROW_PACKED_FROM_OUT_FEATURES = 16_384


def packing_available(model: nn.Module) -> bool:
    """Whether this model's linear layers can run packed here: fp32 on the CPU, with oneDNN's linear ops built in."""
    parameter = next(model.parameters(), None)
    return (parameter is not None and parameter.device.type == "cpu" and parameter.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class _PackedProduct(torch.autograd.Function):
    """y = x W^T + b on the packed weight; the backward gives the input's gradient only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _packed_linear(x, packed, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None, None


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


class PackedForward:
    """The forward of one frozen nn.Linear, installed as the module's own `forward`: the packed product when it
    applies, torch's `linear` otherwise."""

    def __init__(self, module: nn.Linear, pack_now: bool = True):
        self.module = module
        self.packed: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.version = -1
        if pack_now:
            self._pack()

    def __deepcopy__(self, memo: dict) -> PackedForward:
        # A copied model (the tests copy one as a reference) packs its own weights; oneDNN's tensors cannot be
        # copied, and the copy's weights are not yet in place while it is being built, so it packs on first use.
        return PackedForward(copy.deepcopy(self.module, memo), pack_now=False)

    def _pack(self) -> None:
        weight = self.module.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACKED_FOR_ROWS)
        # What the copy was made from: an in-place change bumps the version, a move or cast (`model.to`) swaps the
        # storage; either way the copy is stale. Holding the source keeps its memory from being reused, so a new
        # storage cannot turn up at the same address.
        self.source = weight.detach()
        self.version = weight._version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight, self.module.bias
        if (x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != torch.float32
                or weight.device.type != "cpu" or weight.requires_grad or (bias is not None and bias.requires_grad)
                or (x.numel() == x.shape[-1] and self.module.out_features < _ONE_ROW_PACKED_FROM_OUT_FEATURES)):
            return nn.functional.linear(x, weight, bias)
        if self.source is None or weight.data_ptr() != self.source.data_ptr() or weight._version != self.version:
            self._pack()
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedProduct.apply(x, weight, self.packed, bias)
        return _packed_linear(x, self.packed, bias)


def pack_linears(model: nn.Module) -> int:
    """Run every frozen nn.Linear of `model` on a packed copy of its weight (once: a packed layer is skipped).
    Returns how many layers are packed; 0 where packing does not apply (`packing_available`)."""
    if not packing_available(model):
        return 0
    count = 0
    for module in model.modules():
        # A layer stored in int8/int4 (quantized.py) has no fp32 weight to pack: its `weight` is computed.
        if isinstance(module, nn.Linear) and "weight" in module._parameters and not module.weight.requires_grad:
            if not isinstance(module.__dict__.get("forward"), PackedForward):
                module.forward = PackedForward(module)
            count += 1
    log.info("%d linear layers run on oneDNN-packed weights", count)
    return count
