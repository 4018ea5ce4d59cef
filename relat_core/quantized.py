"""The frozen linear layers in int8 or int4 on the CPU (`--weights`), forward and backward.

relat's base model never trains, and a request alone reads every weight once per latent step forward, once more
backward (the input's gradient, dx = dy W, which the latent thought's training needs) and once per answer token
(bench/RESULTS.md, section 16). Fewer bytes per weight are the only way to fewer bytes read. The LoRA slots
(lora.py), norms, embeddings and the LM head (tied to the embeddings in the embedded model) stay fp32.

Formats (weight-only: activations, gradients and accumulation stay fp32):
- int8: per-output-channel scales, symmetric: W[o] = s[o] * q[o], q in [-127, 127]. 1 byte a weight + 4 per row.
- int4: groups of 32 inputs, asymmetric: W[o, i] = s[o, g] * q[o, i] + z[o, g], q in [0, 15]; two weights a byte,
  plus 8 bytes per group (1.25 bytes a weight in all, against fp32's 4). Group 128 would halve the scales' cost,
  but 576, the embedded model's width, is not a multiple of it; a layer whose inputs are not a multiple of 32
  stays fp32.

Kernels. torch's own weight-only kernels, `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (what gpt-fast
and torchao's CPU layouts run), took 2-6x as long as the fp32 product on this project's AVX2 CPU, even for one
row, and torchao adds no faster CPU kernel nor a backward through int4 (bench/RESULTS.md, section 22). So the
products run on small loops of our own (kernels/lowbit.cpp, built once with torch's C++ extension loader at load
and cached): each row of W is read once, converted in registers (AVX2) and multiplied in fp32 with up to 8 rows of
the input at a time. The backward reads the same stored bytes (no transposed copy, no fp32 copy): dx = (dy * s) q
for int8, and per group (dy * s[:, g]) q + dy z[:, g] for int4, so the gradient is exactly that of the dequantised
weight (tests/test_quantized.py).

Dispatch by rows, as packing.py does: a product of up to `KERNEL_MAX_ROWS` rows (a request's latent and
decoding steps, a batch of up to 8 answers) runs on the kernel; more rows (prompts, reconstructions, a batch's
training passes) dequantise the weight into a temporary fp32 matrix and run torch's fp32 product on it, which is
compute-bound there. The temporary is one scratch matrix per shape and thread, reused: a fresh allocation
page-faulted every product. No packed fp32 copy is kept: it would cost the 4 bytes a weight the format saves.
Where the kernels cannot be built (no C++ compiler), every product takes the dequantising path, and a warning
says so.

The module keeps its path and stays an nn.Linear (the LoRA hooks see it as before); its state dict holds the
low-bit tensors (`weight_q`, `weight_scale`, `weight_zero`), so loading.weights_digest covers what is stored.
`weight` is the dequantised fp32 matrix, computed when read (never in the hot path).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .memory import return_free_memory

log = logging.getLogger(__name__)

FORMATS = ("fp32", "int8", "int4")
WEIGHT_CHOICES = ("auto", *FORMATS)  # auto: int4 where it is exact, else fp32 (quantize_linears)
GROUP = 32
# Up to this many rows a product runs on the low-bit kernel; past it, on the dequantised weight through torch.
# Read off bench/lowbit.py's table (bench/RESULTS.md, section 22.1): the forward converts each weight once for up to
# 8 rows at a time and beats the dequantising path up to 8 rows on every shape of the embedded model; the input
# gradient, which accumulates into the rows of dx, up to 4.
KERNEL_MAX_ROWS = {"int8": {"forward": 8, "input_gradient": 4}, "int4": {"forward": 8, "input_gradient": 4}}

_kernels: Any = None
_kernels_tried = False
_scratch = threading.local()  # per thread: {(N, K): fp32 matrix} for the dequantising path (QuantizedLinear)


def kernels(warn: bool = True) -> Any | None:
    """The compiled kernels of kernels/lowbit.cpp (built on first use, then loaded from torch's extension cache);
    None where they cannot be built (with a warning at the first try, unless `warn` is off: --weights auto then
    keeps fp32, and says so itself)."""
    global _kernels, _kernels_tried
    if not _kernels_tried:
        _kernels_tried = True
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).parent / "kernels" / "lowbit.cpp"
            flags = ["-O3", "-ffast-math"] + (["-mavx2", "-mfma"] if _has_avx2() else [])
            _kernels = load("relat_lowbit", [str(source)], extra_cflags=flags, verbose=False)
        except Exception as error:  # no compiler, no ninja, a build error: the torch path still runs
            (log.warning if warn else log.info)(
                "low-bit kernels unavailable (%s); low-bit products dequantise the weight instead (slower)", error)
            _kernels = None
    return _kernels


def _has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), s fp32 (N,)): symmetric, per output channel."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(weight / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 (N, K/2), s (N, K/32), z (N, K/32)): asymmetric per group of 32 inputs; in a group's 16
    bytes, byte j holds element j (low nibble) and element j + 16 (high nibble), the kernels' layout."""
    weight = weight.detach().float()
    rows, columns = weight.shape
    groups = weight.view(rows, columns // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((groups - low[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)
    packed = q[..., :GROUP // 2] | (q[..., GROUP // 2:] << 4)
    return packed.reshape(rows, columns // 2).contiguous(), scale.contiguous(), low.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    groups = packed.view(rows, -1, GROUP // 2)
    q = torch.cat([groups & 15, groups >> 4], dim=-1).float()  # (N, G, 32)
    return (q * scale[..., None] + zero[..., None]).reshape(rows, -1)


class QuantizedLinear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in int8 or int4 (its bias, if any, stays fp32)."""

    def __init__(self, linear: nn.Linear, fmt: str, stored: tuple[torch.Tensor, ...] | None = None):
        """`stored`: the layer's weight already quantised in `fmt` (quantize_int8's or quantize_int4's result)."""
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate an fp32 weight
        if fmt not in ("int8", "int4"):
            raise ValueError(f"unknown low-bit format {fmt!r}")
        self.in_features, self.out_features, self.format = linear.in_features, linear.out_features, fmt
        weight = linear.weight.detach()
        if fmt == "int8":
            q, scale = stored or quantize_int8(weight)
            self.register_buffer("weight_q", q)
            self.register_buffer("weight_scale", scale)
            self.weight_zero: torch.Tensor | None = None
        else:
            packed, scale, zero = stored or quantize_int4(weight)
            self.register_buffer("weight_q", packed)
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero", zero)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantised weight (fp32, a fresh tensor): what the products compute with."""
        return self.dequantized()

    def dequantized(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight, written into `out` where given (the kernels' path) or into a fresh tensor."""
        lib = kernels()
        if lib is None:
            if self.format == "int8":
                return dequantize_int8(self.weight_q, self.weight_scale)
            return dequantize_int4(self.weight_q, self.weight_scale, self.weight_zero)
        if out is None:
            out = torch.empty(self.out_features, self.in_features)
        if self.format == "int8":
            return lib.int8_dequantize(self.weight_q, self.weight_scale, out)
        return lib.int4_dequantize(self.weight_q, self.weight_scale, self.weight_zero, out)

    def scratch_weight(self) -> torch.Tensor:
        """The dequantised weight in this thread's scratch matrix for the shape, overwritten by the next product:
        read it only within the product that asked. A fresh (N, K) matrix per product would page-fault each of its
        pages in (glibc hands large blocks back to the system on free): bench/lowbit.py measured that at 1-2.4 ms
        a product of the embedded model's shapes, ten times the product itself."""
        buffers = _scratch.__dict__.setdefault("buffers", {})
        shape = (self.out_features, self.in_features)
        if shape not in buffers:
            buffers[shape] = torch.empty(shape)
        return self.dequantized(buffers[shape])

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """rows W^T, rows: contiguous fp32 (M, K)."""
        lib = kernels()
        if lib is not None and rows.shape[0] <= KERNEL_MAX_ROWS[self.format]["forward"]:
            if self.format == "int8":
                return lib.int8_forward(rows, self.weight_q, self.weight_scale)
            return lib.int4_forward(rows, self.weight_q, self.weight_scale, self.weight_zero)
        return rows @ self.scratch_weight().t()

    def input_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """grad W, grad: contiguous fp32 (M, N): the same stored weights as the forward."""
        lib = kernels()
        if lib is not None and grad.shape[0] <= KERNEL_MAX_ROWS[self.format]["input_gradient"]:
            if self.format == "int8":
                return lib.int8_backward(grad, self.weight_q, self.weight_scale)
            return lib.int4_backward(grad, self.weight_q, self.weight_scale, self.weight_zero)
        return grad @ self.scratch_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return nn.functional.linear(x, self.dequantized().to(x.dtype), self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _LowBitProduct.apply(x, self)
        else:
            y = self.product(x.reshape(-1, self.in_features).contiguous()).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


class _LowBitProduct(torch.autograd.Function):
    """y = x W^T on the stored low-bit weight; the backward gives x's gradient from the same weight (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        ctx.module = module
        rows = x.reshape(-1, module.in_features).contiguous()
        return module.product(rows).view(*x.shape[:-1], module.out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        module: QuantizedLinear = ctx.module
        rows = grad.reshape(-1, module.out_features).contiguous().float()
        return module.input_gradient(rows).view(*grad.shape[:-1], module.in_features), None


def quantize_linears(model: nn.Module, fmt: str) -> str:
    """Store every frozen nn.Linear of `model` but the LM head in `fmt`; returns the format the layers are stored
    in. fp32: nothing changes. auto: int4 where int4 holds every one of those weights exactly (a checkpoint that
    was itself 4-bit with groups of 32, such as the embedded SmolLM2's Q4_1 GGUF) and relat's kernels are built,
    else fp32: either way the products use the checkpoint's own weights, bit for bit. int8 and int4 run on the
    CPU with fp32 models only (elsewhere they are refused; auto keeps fp32)."""
    if fmt not in WEIGHT_CHOICES:
        raise ValueError(f"unknown weights format {fmt!r}; use one of {', '.join(WEIGHT_CHOICES)}")
    if fmt == "fp32":
        return "fp32"
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        if fmt == "auto":
            return "fp32"
        raise ValueError(f"--weights {fmt} runs on the CPU with fp32 models only (this one: {parameter.device}, "
                         f"{parameter.dtype})")
    stored = "int4" if fmt == "auto" else fmt
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replacements = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                    if type(child) is nn.Linear and child is not head and not child.weight.requires_grad
                    and not (stored == "int4" and child.in_features % GROUP)]
    if not replacements:
        return "fp32"
    quantized: list[tuple[torch.Tensor, ...] | None] = [None] * len(replacements)
    if fmt == "auto":  # in plain torch first: a checkpoint that stays fp32 never builds the kernels
        for index, (_, _, child) in enumerate(replacements):
            quantized[index] = quantize_int4(child.weight)
            if not torch.equal(dequantize_int4(*quantized[index]), child.weight):
                log.info("weights auto: fp32 (int4 would not hold this checkpoint's linear layers exactly)")
                return "fp32"
        if kernels(warn=False) is None:
            log.info("weights auto: fp32 (int4 is fast only on relat's kernels, which could not be built here)")
            return "fp32"
    kernels()  # built (or found in the cache) now, at load, not during the first request
    for (parent, name, child), tensors in zip(replacements, quantized, strict=True):
        setattr(parent, name, QuantizedLinear(child, stored, tensors))
    _into_own_memory(model)
    return_free_memory()  # the quantising temporaries: ~600 MiB of the embedded model's server stayed resident
    log.info("%d linear layers stored in %s%s", len(replacements), stored,
             " (auto: int4 holds them exactly)" if fmt == "auto" else "")
    return stored


def _into_own_memory(model: nn.Module) -> None:
    """Copy every fp32 parameter and buffer left (embeddings, the LM head tied to them, norms, biases) into memory
    of its own. transformers loads a safetensors checkpoint as views of one memory-mapped file: those few tensors
    would keep the whole mapping, the quantised layers' fp32 pages included, resident (513 of the embedded model's
    1,216 MiB after loading int8, by /proc/self/smaps)."""
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for parameter in module.parameters(recurse=False):
                if id(parameter) not in seen:  # a tied weight is one Parameter: copied once, still tied
                    seen.add(id(parameter))
                    parameter.data = parameter.data.clone()
            if not isinstance(module, QuantizedLinear):  # its buffers are the quantised tensors, already its own
                for name, buffer in module.named_buffers(recurse=False):
                    module._buffers[name] = buffer.clone()
