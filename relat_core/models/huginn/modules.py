"""Huginn's building blocks: RMSNorm, rotary embeddings, attention with a learned qk_bias, the gated MLP and the
"sandwich" block that prelude, core and coda all use.

As the published checkpoint and the reference code define them (arXiv 2502.05171; seal-rg/recurrent-pretraining,
`recpre/raven_modeling_minimal.py`), with its parameter names.

Shapes: B batch rows, T new positions in a call, K cached positions, H heads, D head size, d = n_embd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import HuginnConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # In fp32 whatever the model's dtype, as the checkpoint was trained: a bf16 mean of squares drifts.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


Rope = tuple[Tensor, Tensor]  # cos and sin, (B, T, 1, D/2) fp32


def rope_angles(positions: Tensor, head_dim: int, base: float) -> Rope:
    """The rotary table (the reference's `freqs_cis`) for these positions, computed on the fly in fp32: a buffer
    would be cast to bf16 with the model, and is cheap to rebuild (T x D/2 numbers per call)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inverse_frequencies = 1.0 / (base**exponents)
    angles = positions.to(torch.float32)[..., None] * inverse_frequencies  # (B, T, D/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head, in fp32; x is (B, T, H, D)."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return rotated.type_as(x)


@dataclass
class AttentionMask:
    """What scaled_dot_product_attention gets: a (B, 1, T, K+T) bool or additive mask, or none with `causal`."""

    mask: Tensor | None
    causal: bool


# Given a block's new keys and values, (B, H, T, D), returns everything the new queries attend over, (B, H, K+T, D):
# the cache's past entries for this block (and recurrence step) followed by the new ones.
KeyValueSource = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _no_cache(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    return keys, values


class CausalSelfAttention(nn.Module):
    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.Wqkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # rows: q, then k, then v
        if config.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.num_heads, self.head_dim))  # q's and k's, pre-RoPE
        else:
            self.register_parameter("qk_bias", None)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor, rope: Rope, mask: AttentionMask, keys_values: KeyValueSource) -> Tensor:
        batch, length, _ = x.shape
        queries, keys, values = self.Wqkv(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        if self.qk_bias is not None:
            queries, keys = queries + self.qk_bias[0], keys + self.qk_bias[1]
        queries, keys = apply_rope(queries, rope), apply_rope(keys, rope)
        queries, keys, values = queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        keys, values = keys_values(keys, values)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask.mask, is_causal=mask.causal)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))


class GatedMLP(nn.Module):
    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)  # rows: gate, then up
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class SandwichBlock(nn.Module):
    """x = n2(attn(n1 x) + x); x = n4(mlp(n3 x) + x): the norms after each residual keep the state's scale fixed
    however often the core block is iterated."""

    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = GatedMLP(config)
        self.norm_3 = RMSNorm(config.n_embd, config.norm_eps)
        self.norm_4 = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x: Tensor, rope: Rope, mask: AttentionMask, keys_values: KeyValueSource) -> Tensor:
        x = self.norm_2(self.attn(self.norm_1(x), rope, mask, keys_values) + x)
        return self.norm_4(self.mlp(self.norm_3(x)) + x)
