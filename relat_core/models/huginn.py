"""Huginn (huginn-0125, "raven"; arXiv 2502.05171): a recurrent-depth decoder, relat_core's own implementation.

A prelude of sandwich blocks embeds each token; a latent state, random or zero at first, is then refined r times by
s <- core(adapter([s, e])); a coda reads the final state. The depth r is a per-call knob (`num_steps`), and each
token may stop early when an exit criterion fires. Architecture, weight names and cache layout follow the published
checkpoint and the reference code (seal-rg/recurrent-pretraining, `recpre/raven_modeling_minimal.py`), summarised
in ../shared/notes/relat-notes.md section 11; the code here is written from that description, without transformers'
remote code, so that relat can give each request its own depth and exits and later train through the recurrence.

Shapes: B batch rows, T new positions in a call, K cached positions, H heads, D head size, d = n_embd.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HUGINN_MODEL_TYPE = "huginn_raven"
MAX_RECURRENCE = 1 << 20  # "no truncation": more recurrences than any call runs
EXIT_CRITERIA = ("kl", "latent-diff", "argmax-stability")
# The reference's "auto" thresholds: KL between successive next-token distributions, relative change of the
# latent state, and the number of successive steps with the same argmax.
DEFAULT_EXIT_THRESHOLDS: dict[str, float] = {"kl": 1e-3, "latent-diff": 0.03, "argmax-stability": 5}
# Buffers the reference saves with the weights but that are a function of the config: recomputed, never loaded.
RECOMPUTED_BUFFERS = ("freqs_cis",)

# What the published config calls some fields, and what this config calls them.
_CONFIG_ALIASES = {"n_heads": "num_attention_heads", "hidden_size": "n_embd"}
# Block variants this module implements; a config naming another would silently compute something else.
_SUPPORTED_VARIANTS = {"block_class_name": "SandwichBlock", "injection_type": "linear", "mlp_class_name": "GatedMLP",
                       "nonlin_name": "SiLU", "norm_class_name": "RMSNorm_llama"}


class HuginnLoadError(ValueError):
    """A folder that claims to be Huginn but whose config or weights do not fit this architecture."""


@dataclass
class HuginnConfig:
    """The fields of the published `raven_config_minimal.json`; unknown keys are kept in `extra` and written back."""

    n_embd: int = 5280
    num_attention_heads: int = 55
    num_key_value_heads: int = 55
    intermediate_size: int = 17920
    vocab_size: int = 65536
    padded_vocab_size: int | None = None  # rows of the embedding when larger than vocab_size
    block_size: int = 4096
    padding_multiple: int = 4096
    tie_embeddings: bool = True
    bias: bool = False  # the adapter's bias; attention and MLP never have one
    architecture_class_name: str = "RecurrentGPT"
    block_class_name: str = "SandwichBlock"
    norm_class_name: str = "RMSNorm_llama"
    norm_eps: float = 1e-6
    mlp_class_name: str = "GatedMLP"
    nonlin_name: str = "SiLU"
    init_strategy: str = "takase"
    init_orthogonal: bool = False
    state_init: str = "like-init"
    injection_type: str = "linear"
    n_layers_in_recurrent_block: int = 4
    mean_recurrence: int = 32
    sampling_scheme: str = "poisson-lognormal-filling"
    mean_backprop_depth: int = 8
    n_layers_in_prelude: int = 2
    n_layers_in_coda: int = 2
    qk_bias: bool = True
    activation_checkpoint_impl: str = "per-iteration"
    rope_base: float = 50_000.0
    model_type: str = HUGINN_MODEL_TYPE
    torch_dtype: str = "bfloat16"
    _name_or_path: str = ""  # where it was loaded from (the engine names an exported adapter's base with it)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type != HUGINN_MODEL_TYPE:
            raise HuginnLoadError(f"model_type is {self.model_type!r}, not {HUGINN_MODEL_TYPE!r}")
        for name, supported in _SUPPORTED_VARIANTS.items():
            if getattr(self, name) != supported:
                raise HuginnLoadError(f"{name} {getattr(self, name)!r} is not supported (only {supported!r})")
        if self.n_embd % self.num_attention_heads:
            raise HuginnLoadError(f"n_embd {self.n_embd} is not a multiple of {self.num_attention_heads} heads")
        if self.num_key_value_heads != self.num_attention_heads:
            # The reference adds one qk_bias of n_heads rows to both q and k: it only works without grouped heads.
            raise HuginnLoadError("num_key_value_heads must equal num_attention_heads")
        if self.head_dim % 2:
            raise HuginnLoadError(f"head size {self.head_dim} is odd; rotary embeddings rotate pairs")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HuginnConfig:
        data = dict(data)
        for alias, name in _CONFIG_ALIASES.items():
            if alias in data:
                value = data.pop(alias)
                data.setdefault(name, value)
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(**{key: value for key, value in data.items() if key in known}, extra=extra)

    @classmethod
    def from_folder(cls, folder: str | Path) -> HuginnConfig:
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "_name_or_path")}
        if data["padded_vocab_size"] is None:
            del data["padded_vocab_size"]
        return {**self.extra, **data}

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.num_attention_heads

    @property
    def hidden_size(self) -> int:  # what code written for transformers' configs asks for
        return self.n_embd

    @property
    def max_position_embeddings(self) -> int:  # the context it was trained for, by transformers' name
        return self.block_size

    @property
    def embedding_rows(self) -> int:
        return max(self.vocab_size, self.padded_vocab_size or 0)

    @property
    def embed_scale(self) -> float:
        """Input embeddings are multiplied by sqrt(n_embd) before the prelude (also the initial state's)."""
        return math.sqrt(self.n_embd)

    @property
    def init_std(self) -> float:
        """The "takase" init's std, also the initial latent state's std before `embed_scale`."""
        return math.sqrt(2 / (5 * self.n_embd))

    @property
    def effective_expected_depth(self) -> int:
        core_layers = self.n_layers_in_recurrent_block * self.mean_recurrence
        return self.n_layers_in_prelude + self.n_layers_in_coda + core_layers


# -- building blocks ----------------------------------------------------------------------------------------------


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


# -- the KV cache -------------------------------------------------------------------------------------------------

KeysValues = tuple[Tensor, Tensor]


class HuginnCache:
    """Keys and values per (block, recurrence step), as the reference keeps them: one entry per prelude block, one
    per core layer and step, one per coda block (the reference's indices: prelude i at i, core layer l of step s at
    n_prelude + n_core * s + l, coda j at -1 - j).

    A position that stopped after d steps has no entries past step d - 1; a later query at step s reads it at its
    latest computed step with the same core-layer position, min(s, d - 1) (the reference's "latest-m4" lookup).
    Entries are dense (B, H, K, D) tensors per step; where a position has none, `commit` fills the slot with a copy
    of its last entry, and the lookup selects by `depth` anyway (so caches joined with other filler stay correct).
    Rows of a batch, and positions of a row, may have different depths.
    """

    def __init__(self, config: HuginnConfig):
        self.config = config
        self.prelude: list[KeysValues | None] = [None] * config.n_layers_in_prelude
        self.coda: list[KeysValues | None] = [None] * config.n_layers_in_coda
        self.core_steps: list[list[KeysValues]] = [[] for _ in range(config.n_layers_in_recurrent_block)]
        # Per core layer: every position's entry at its own last step, what a query past that step reads.
        self.core_latest: list[KeysValues | None] = [None] * config.n_layers_in_recurrent_block
        self.depth: Tensor | None = None  # (B, K) long: recurrences computed per cached position
        self.min_depth = 0  # the fewest recurrences of any cached position: below it, lookups need no selection

    @property
    def length(self) -> int:
        return 0 if self.depth is None else self.depth.shape[1]

    def get_seq_length(self) -> int:
        return self.length

    @property
    def batch_size(self) -> int | None:
        return None if self.depth is None else self.depth.shape[0]

    @property
    def num_steps_stored(self) -> int:
        return max((len(steps) for steps in self.core_steps), default=0)

    def core_lookup(self, layer: int, step: int) -> KeysValues:
        """Every cached position's keys and values for core layer `layer` as seen from recurrence step `step`."""
        latest = self.core_latest[layer]
        assert latest is not None and self.depth is not None
        if step >= len(self.core_steps[layer]):  # no cached position got this far: all at their last step
            return latest
        if step < self.min_depth:  # every cached position reached this step (always so at a fixed depth)
            return self.core_steps[layer][step]
        step_keys, step_values = self.core_steps[layer][step]
        reached = (self.depth > step)[:, None, :, None]
        return torch.where(reached, step_keys, latest[0]), torch.where(reached, step_values, latest[1])

    # -- row and position operations (relat_core.latent.SequenceState's, as on its transformers cache) --------

    def select_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows (requests that left a batch)."""
        self._map(lambda t: t[rows], lambda depth: depth[rows])

    def crop(self, length: int) -> None:
        """Forget positions from `length` on."""
        self._map(lambda t: t[:, :, :length], lambda depth: depth[:, :length])

    def crop_to(self, length: int) -> None:
        """Hold at most `length` positions (a failed call appended nothing: entries are committed at its end)."""
        if self.length > length:
            self.crop(length)

    def detach_rows(self, rows: Tensor) -> None:
        """Make the cached entries of these rows ((B,) bool) constants to the gradient."""
        keep = rows[:, None, None, None]
        self._map(lambda t: torch.where(keep, t.detach(), t), lambda depth: depth)

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` positions (padding that no row can see any more)."""
        self._map(lambda t: t[:, :, count:], lambda depth: depth[:, count:])

    def row(self, index: int, first: int) -> HuginnCache:
        """A copy of row `index` from position `first` on."""
        copy = HuginnCache(self.config)
        if self.depth is not None:
            rows = torch.tensor([index], device=self.depth.device)
            copy.__dict__.update(self.__dict__)
            copy._map(lambda t: t[rows, :, first:], lambda depth: depth[rows, first:])  # new lists: no sharing
        return copy

    @classmethod
    def joined(cls, config: HuginnConfig, parts: Sequence[tuple[HuginnCache, int]], length: int) -> HuginnCache:
        """The rows of several caches (each with its batch size) as one batch, every row left-padded to `length`
        positions. Padding has the deepest depth, so that lookups never select around it (queries never see it);
        a cache that stored fewer recurrence steps than another is filled with its latest entries, which its
        positions' depths make the lookup read anyway."""
        joined = cls(config)
        filled = [cache for cache, _ in parts if cache.length]
        if not filled:
            return joined
        template = filled[0].prelude[0][0]  # (B, H, K, D)
        heads, head_dim = template.shape[1], template.shape[-1]

        def padded(pair: KeysValues | None, rows: int) -> KeysValues:
            if pair is None:
                empty = template.new_zeros(rows, heads, 0, head_dim)
                pair = (empty, empty)
            return tuple(F.pad(t, (0, 0, length - t.shape[2], 0)) for t in pair)  # type: ignore[return-value]

        def cat(pairs: list[KeysValues]) -> KeysValues:
            return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

        joined.prelude = [cat([padded(c.prelude[i], n) for c, n in parts]) for i in range(len(joined.prelude))]
        joined.coda = [cat([padded(c.coda[i], n) for c, n in parts]) for i in range(len(joined.coda))]
        for layer in range(len(joined.core_steps)):
            steps = max(len(c.core_steps[layer]) for c, _ in parts)
            joined.core_latest[layer] = cat([padded(c.core_latest[layer], n) for c, n in parts])
            joined.core_steps[layer] = [
                cat([padded(c.core_steps[layer][step] if step < len(c.core_steps[layer]) else c.core_latest[layer], n)
                     for c, n in parts]) for step in range(steps)]
        deepest = max(int(c.depth.max()) for c in filled)
        depths = []
        for cache, rows in parts:
            depth = cache.depth if cache.depth is not None else template.new_zeros(rows, 0, dtype=torch.long)
            depths.append(F.pad(depth, (length - depth.shape[1], 0), value=deepest))
        joined._set_depth(torch.cat(depths))
        return joined

    def _map(self, entry: Callable[[Tensor], Tensor], depth: Callable[[Tensor], Tensor]) -> None:
        if self.depth is None:
            return

        def both(pair: KeysValues | None) -> KeysValues | None:
            return None if pair is None else (entry(pair[0]), entry(pair[1]))

        self.prelude = [both(pair) for pair in self.prelude]
        self.coda = [both(pair) for pair in self.coda]
        self.core_latest = [both(pair) for pair in self.core_latest]
        self.core_steps = [[both(pair) for pair in steps] for steps in self.core_steps]  # type: ignore[misc]
        self._set_depth(depth(self.depth))

    def commit(self, chunk: _ChunkEntries, chunk_depth: Tensor) -> None:
        """Append a call's new positions (their entries and depths, (B, T)) once the call is done: during it,
        lookups of the past must see the cache as it was."""
        if self.depth is not None and self.depth.shape[0] != chunk_depth.shape[0]:
            raise ValueError(f"cache holds {self.depth.shape[0]} rows, the call had {chunk_depth.shape[0]}")

        def append(old: KeysValues | None, new: KeysValues) -> KeysValues:
            if old is None:
                return new
            return torch.cat([old[0], new[0]], dim=2), torch.cat([old[1], new[1]], dim=2)

        for index, new in enumerate(chunk.prelude):
            assert new is not None
            self.prelude[index] = append(self.prelude[index], new)
        for index, new in enumerate(chunk.coda):
            assert new is not None
            self.coda[index] = append(self.coda[index], new)
        for layer, new_steps in enumerate(chunk.core_steps):
            new_latest, old_latest = chunk.core_latest[layer], self.core_latest[layer]
            assert new_latest is not None
            old_steps = self.core_steps[layer]
            merged = []
            for step in range(max(len(old_steps), len(new_steps))):
                # Filler where a side never reached this step: its latest entry, which the lookup reads anyway.
                old = old_steps[step] if step < len(old_steps) else old_latest
                merged.append(append(old, new_steps[step] if step < len(new_steps) else new_latest))
            self.core_steps[layer] = merged
            self.core_latest[layer] = append(old_latest, new_latest)
        self._set_depth(chunk_depth if self.depth is None else torch.cat([self.depth, chunk_depth], dim=1))

    def _set_depth(self, depth: Tensor) -> None:
        self.depth = depth
        self.min_depth = int(depth.min()) if depth.numel() else 0


class _ChunkEntries:
    """The new positions' keys and values during one forward call, and the attention sources built on them."""

    def __init__(self, config: HuginnConfig, cache: HuginnCache | None):
        self.cache = cache
        self.prelude: list[KeysValues | None] = [None] * config.n_layers_in_prelude
        self.coda: list[KeysValues | None] = [None] * config.n_layers_in_coda
        self.core_steps: list[list[KeysValues]] = [[] for _ in range(config.n_layers_in_recurrent_block)]
        self.core_latest: list[KeysValues | None] = [None] * config.n_layers_in_recurrent_block

    def _with_past(self, past: KeysValues | None, keys: Tensor, values: Tensor) -> KeysValues:
        if past is None or self.cache is None or self.cache.length == 0:
            return keys, values
        return torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)

    def prelude_source(self, index: int) -> KeyValueSource:
        def source(keys: Tensor, values: Tensor) -> KeysValues:
            self.prelude[index] = (keys, values)
            return self._with_past(self.cache.prelude[index] if self.cache is not None else None, keys, values)

        return source

    def coda_source(self, index: int, store: bool) -> KeyValueSource:
        """store False: an exit check's look at the coda, whose entries are not the position's final ones."""

        def source(keys: Tensor, values: Tensor) -> KeysValues:
            if store:
                self.coda[index] = (keys, values)
            return self._with_past(self.cache.coda[index] if self.cache is not None else None, keys, values)

        return source

    def core_source(self, layer: int, step: int, active: Tensor) -> KeyValueSource:
        """active: (B, T) bool, the new positions still iterating at this step; the others keep (and are read at)
        their last step's entries, like exited positions in the cache."""

        def source(keys: Tensor, values: Tensor) -> KeysValues:
            latest = self.core_latest[layer]
            if latest is not None:  # every position runs step 0, so only later steps can have stopped ones
                keep = active[:, None, :, None]
                keys, values = torch.where(keep, keys, latest[0]), torch.where(keep, values, latest[1])
            self.core_latest[layer] = (keys, values)
            if self.cache is not None:  # without a cache nobody reads older steps again
                self.core_steps[layer].append((keys, values))
            past = self.cache.core_lookup(layer, step) if self.cache is not None and self.cache.length else None
            return self._with_past(past, keys, values)

        return source


# -- adaptive exit ------------------------------------------------------------------------------------------------


class _ExitCriterion:
    """Per-position exit test after each recurrence step; `logits` runs the coda and head only if needed."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def start(self, state: Tensor) -> None:
        raise NotImplementedError

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        """Returns (B, T) bool, where the criterion fires; tracked values change only where `active`."""
        raise NotImplementedError


class _KLExit(_ExitCriterion):
    """KL(previous || current) of the next-token distributions below the threshold (the first step compares
    against the uniform distribution, as the reference does)."""

    def start(self, state: Tensor) -> None:
        self.previous: Tensor | None = None

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        log_probs = F.log_softmax(logits().float(), dim=-1)
        if self.previous is None:
            divergence = -math.log(log_probs.shape[-1]) - log_probs.mean(-1)
            self.previous = log_probs
        else:
            divergence = (self.previous.exp() * (self.previous - log_probs)).sum(-1)
            self.previous = torch.where(active[..., None], log_probs, self.previous)
        return divergence < self.threshold


class _LatentDiffExit(_ExitCriterion):
    """|s_k - s_{k-1}| / |s_k| below the threshold (the state before the final norm)."""

    def start(self, state: Tensor) -> None:
        self.previous = state.float()

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        current = state.float()
        change = (current - self.previous).norm(dim=-1) / current.norm(dim=-1).clamp(min=1e-12)
        self.previous = torch.where(active[..., None], current, self.previous)
        return change < self.threshold


class _ArgmaxStabilityExit(_ExitCriterion):
    """The same argmax for `threshold` successive steps after the one where it first appeared."""

    def start(self, state: Tensor) -> None:
        self.previous: Tensor | None = None
        self.stable_for = torch.zeros(state.shape[:2], dtype=torch.long, device=state.device)

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        current = logits().argmax(dim=-1)
        if self.previous is not None:
            stable_for = torch.where(current == self.previous, self.stable_for + 1, 0)
            self.stable_for = torch.where(active, stable_for, self.stable_for)
            current = torch.where(active, current, self.previous)
        self.previous = current
        return self.stable_for >= self.threshold


def make_exit_criterion(name: str | None, threshold: float | str | None = None) -> _ExitCriterion | None:
    """None or "none": no adaptive exit. threshold None or "auto": the reference's default for the criterion."""
    if name in (None, "none"):
        return None
    classes = {"kl": _KLExit, "latent-diff": _LatentDiffExit, "argmax-stability": _ArgmaxStabilityExit}
    if name not in classes:
        raise ValueError(f"unknown exit_criterion {name!r}; use one of none, {', '.join(EXIT_CRITERIA)}")
    value = DEFAULT_EXIT_THRESHOLDS[name] if threshold in (None, "auto") else float(threshold)  # type: ignore[arg-type]
    return classes[name](value)


# -- the model ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowRecurrence:
    """How one batch row iterates: a request's depth options, resolved (relat_core.params.TTTParams)."""

    num_steps: int
    init_scale: float = 1.0
    exit_criterion: str | None = None  # None or "none": a fixed depth
    exit_threshold: float | None = None  # None: the criterion's default
    backprop_depth: int | None = None  # gradient through the last this many recurrences; None: all of them
    # The random initial state of the position at index p is drawn from a generator seeded by (noise_seed, p): the
    # same state whatever the batch, its padding or the chunk the position arrives in (batched equals alone, and a
    # thought re-run after training starts from the states it was trained on).
    noise_seed: int = 0


@dataclass
class Recurrence:
    """Per-row recurrence for the forwards run while it is bound (`HuginnForCausalLM.recurring`), the way the
    engine's adapter slots are bound; `used` receives the recurrences each position of the last forward ran."""

    rows: list[RowRecurrence]
    # Whether the rows' exit criteria apply. The engine binds them off around a training step, whose forwards run
    # every position its full num_steps even where they need no graph (a truncated thought's first latent steps).
    exits: bool = True
    used: Tensor | None = None  # (B, T) long


def _position_seed(noise_seed: int, position: int) -> int:
    """A generator seed for one position of one request: distinct positions and seeds give distinct streams."""
    return (noise_seed * 1_000_003 + position) % (2**63)


class _RowExits:
    """Each row's exit criterion (rows may differ): the criteria in use, each fired only on its own rows; the
    coda's prediction, when a criterion reads it, is computed once per step for all."""

    def __init__(self, rows: Sequence[tuple[str | None, float | str | None]], device: torch.device):
        self.groups: list[tuple[_ExitCriterion, Tensor]] = []
        for key in dict.fromkeys(rows):
            criterion = make_exit_criterion(*key)
            if criterion is not None:
                mask = torch.tensor([row == key for row in rows], device=device)
                self.groups.append((criterion, mask))

    def start(self, state: Tensor) -> None:
        for criterion, _ in self.groups:
            criterion.start(state)

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        computed: list[Tensor] = []

        def once() -> Tensor:
            if not computed:
                computed.append(logits())
            return computed[0]

        fired = torch.zeros_like(active)
        for criterion, mask in self.groups:
            fired |= mask[:, None] & criterion.update(state, active, once)
        return fired


@dataclass
class HuginnOutput:
    logits: Tensor | None  # (B, T, V) fp32, None when not asked for
    last_hidden_state: Tensor  # (B, T, d): after the coda and the final norm, what the LM head reads
    latent_states: Tensor  # (B, T, d): each position's recurrent state after its last step (before any norm)
    recurrences: Tensor  # (B, T) long: core-block iterations each position used
    cache: HuginnCache | None


class HuginnForCausalLM(nn.Module):
    """Parameter names are the checkpoint's (`transformer.prelude.0.attn.Wqkv.weight`, ...), so the published
    safetensors load as they are."""

    def __init__(self, config: HuginnConfig):
        super().__init__()
        self.config = config
        width = config.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_rows, width),
            prelude=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_prelude)),
            adapter=nn.Linear(2 * width, width, bias=config.bias),  # over concat(state, embedded input)
            core_block=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_recurrent_block)),
            coda=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_coda)),
            ln_f=RMSNorm(width, config.norm_eps),  # used twice: after the recurrence and after the coda
        ))
        self.lm_head = nn.Linear(width, config.embedding_rows, bias=False)
        self.recurrence: Recurrence | None = None  # bound per batch by `recurring`
        if self.lm_head.weight.device.type != "meta":  # built on meta to be loaded: nothing to initialise
            self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer["wte"].weight

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The "takase" init of the reference (for random models in tests and benchmarks): truncated normals with
        std sqrt(2 / 5d), output projections scaled down by sqrt(2 * expected depth)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.effective_expected_depth)

        def normal(tensor: Tensor, scale: float) -> None:
            nn.init.trunc_normal_(tensor, std=scale, a=-3 * scale, b=3 * scale, generator=generator)

        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, CausalSelfAttention) and module.qk_bias is not None:
                nn.init.zeros_(module.qk_bias)
            elif isinstance(module, nn.Embedding):
                normal(module.weight, std)
            elif isinstance(module, nn.Linear) and name != "lm_head":
                if name.endswith("mlp.fc"):  # gate rows like an input projection, up rows like an output one
                    gate, up = module.weight.chunk(2, dim=0)
                    normal(gate, std)
                    normal(up, out_std)
                else:
                    normal(module.weight, out_std if name.endswith(".proj") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if not self.config.tie_embeddings:
            normal(self.lm_head.weight, std)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer["wte"].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer["wte"].weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer["wte"]  # type: ignore[return-value]

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def new_cache(self) -> HuginnCache:
        return HuginnCache(self.config)

    @contextmanager
    def recurring(self, recurrence: Recurrence | None) -> Iterator[None]:
        """The forwards inside iterate each row as `recurrence` says (None: as their arguments say)."""
        self.recurrence = recurrence
        try:
            yield
        finally:
            self.recurrence = None

    def seeded_initial_state(self, like: Tensor, rows: Sequence[RowRecurrence], position_ids: Tensor) -> Tensor:
        """Each row's initial state, every position drawn from its own seeded generator (`RowRecurrence`)."""
        state = torch.zeros(like.shape, dtype=torch.float32)
        positions = position_ids.tolist()
        for index, row in enumerate(rows):
            std = self.config.init_std * row.init_scale
            if std <= 0:
                continue
            for column, position in enumerate(positions[index]):
                generator = torch.Generator().manual_seed(_position_seed(row.noise_seed, position))
                nn.init.trunc_normal_(state[index, column], std=std, a=-3 * std, b=3 * std, generator=generator)
        return (state * self.config.embed_scale).to(device=like.device, dtype=like.dtype)

    def initial_state(self, like: Tensor, init_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """The state before the first recurrence: a truncated normal of std init_std * init_scale (times
        embed_scale, as the embeddings), or zeros for init_scale 0, which makes the forward deterministic."""
        std = self.config.init_std * init_scale
        if std <= 0:
            return torch.zeros_like(like)
        state = torch.empty(like.shape, dtype=torch.float32, device=like.device)
        nn.init.trunc_normal_(state, std=std, a=-3 * std, b=3 * std, generator=generator)
        return (state * self.config.embed_scale).to(like.dtype)

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        *,
        cache: HuginnCache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        num_steps: int | Sequence[int] | Tensor | None = None,
        init_scale: float = 1.0,
        initial_state: Tensor | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | str | None = None,
        backprop_depth: int | None = None,
        return_logits: bool = True,
        generator: torch.Generator | None = None,
    ) -> HuginnOutput:
        """Run T new positions per row through prelude, recurrence and coda; append them to `cache` if given.

        input_ids (B, T) or inputs_embeds (B, T, d): embeddings as the embedding table holds them (the model
            multiplies either by embed_scale, as the reference does).
        attention_mask: None for causal attention over the cache and the new positions, else a (B, T, K+T) or
            (B, 1, T, K+T) mask, bool (True: may attend) or additive, for padded batches and hidden keys.
        position_ids: (B, T); by default K, K+1, ... for every row.
        num_steps: recurrences, an int, one per row (B,) or one per position (B, T); default mean_recurrence.
        init_scale: the random initial state's scale; 0 gives zeros. initial_state (B, T, d) replaces it (a warm
            start, the reference's continuous compute).
        exit_criterion: None, "kl", "latent-diff" or "argmax-stability": a position stops iterating once it fires
            (`exit_threshold`, default the reference's), and never runs more than its num_steps. Only without
            gradient: a forward that records one runs every position its full num_steps, as Huginn trained.
        backprop_depth: with gradient, it flows through each position's last backprop_depth recurrences only
            (truncated backpropagation, as Huginn trained); the steps before run without a graph where they can.
        A bound `Recurrence` (`recurring`) replaces num_steps, init_scale, the exit and backprop_depth per row.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        embeds = self.transformer["wte"](input_ids) if input_ids is not None else inputs_embeds.to(self.dtype)
        batch, length = embeds.shape[:2]
        device = embeds.device
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch_size not in (None, batch):
            raise ValueError(f"cache holds {cache.batch_size} rows, the call has {batch}")
        if position_ids is None:
            position_ids = (past + torch.arange(length, device=device)).expand(batch, length)
        rope = rope_angles(position_ids, self.config.head_dim, self.config.rope_base)
        mask = self._attention_mask(attention_mask, length, past, device)
        bound = self.recurrence
        if bound is not None and len(bound.rows) != batch:
            raise ValueError(f"the bound recurrence has {len(bound.rows)} rows, the call has {batch}")
        if bound is not None:
            rows = bound.rows
            num_steps = [row.num_steps for row in rows]
            exits = [(row.exit_criterion, row.exit_threshold) for row in rows]
            truncation = [row.backprop_depth or MAX_RECURRENCE for row in rows]
        else:
            exits = [(exit_criterion, exit_threshold)] * batch
            truncation = [backprop_depth or MAX_RECURRENCE] * batch
        targets = self._step_targets(num_steps, batch, length, device)
        training = torch.is_grad_enabled()
        with_exits = bound.exits if bound is not None else not training
        criterion = _RowExits(exits, device) if with_exits and not training else None
        # A position's state enters step s without its graph while s <= num_steps - backprop_depth, so that the
        # gradient crosses its last backprop_depth steps only; steps before every position's cut run graph-free.
        cut = (targets - torch.tensor(truncation, device=device)[:, None]).clamp(min=0)  # (B, T)
        graph_free_steps = int(cut.min()) if training else 0
        chunk = _ChunkEntries(self.config, cache)

        x = embeds * self.config.embed_scale
        for index, block in enumerate(self.transformer["prelude"]):
            x = block(x, rope, mask, chunk.prelude_source(index))
        injected = x
        if initial_state is not None:
            state = initial_state.to(injected.dtype)
        elif bound is not None:
            state = self.seeded_initial_state(injected, bound.rows, position_ids)
        else:
            state = self.initial_state(injected, init_scale, generator)

        recurrences = torch.zeros(batch, length, dtype=torch.long, device=device)
        exited = torch.zeros(batch, length, dtype=torch.bool, device=device)
        if criterion is not None:
            criterion.start(state)
        for step in range(int(targets.max())):
            active = (targets > step) & ~exited
            if not bool(active.any()):
                break
            if training and step >= graph_free_steps:
                state = torch.where((step <= cut)[..., None], state.detach(), state)
            with torch.set_grad_enabled(training and step >= graph_free_steps):
                new_state = self.transformer["adapter"](torch.cat([state, injected], dim=-1))
                for layer, block in enumerate(self.transformer["core_block"]):
                    new_state = block(new_state, rope, mask, chunk.core_source(layer, step, active))
            state = torch.where(active[..., None], new_state, state)  # stopped positions keep their last state
            recurrences = recurrences + active.long()
            # Test for exits only where a position could still go on; the KL and argmax tests read the coda's
            # prediction from the current state (without keeping its entries: they are not the final ones).
            if criterion is not None and criterion.groups and bool((active & (targets > step + 1)).any()):

                def peek_logits(current: Tensor = state) -> Tensor:
                    return self.lm_head(self._coda(current, rope, mask, chunk, store=False))

                exited |= active & criterion.update(state, active, peek_logits)
        if bound is not None:
            bound.used = recurrences

        hidden = self._coda(state, rope, mask, chunk, store=True)
        logits = self.lm_head(hidden).float() if return_logits else None
        if cache is not None:
            cache.commit(chunk, recurrences)
        return HuginnOutput(logits=logits, last_hidden_state=hidden, latent_states=state, recurrences=recurrences,
                            cache=cache)

    def _coda(self, state: Tensor, rope: Rope, mask: AttentionMask, chunk: _ChunkEntries, store: bool) -> Tensor:
        x = self.transformer["ln_f"](state)
        for index, block in enumerate(self.transformer["coda"]):
            x = block(x, rope, mask, chunk.coda_source(index, store))
        return self.transformer["ln_f"](x)

    def _attention_mask(self, attention_mask: Tensor | None, length: int, past: int,
                        device: torch.device) -> AttentionMask:
        if attention_mask is not None:
            mask = attention_mask if attention_mask.dim() == 4 else attention_mask[:, None]
            if mask.shape[-2:] != (length, past + length):
                raise ValueError(f"attention_mask ends in {tuple(mask.shape[-2:])}, expected ({length}, "
                                 f"{past + length})")
            return AttentionMask(mask if mask.dtype == torch.bool else mask.to(self.dtype), causal=False)
        if past == 0:
            return AttentionMask(None, causal=length > 1)
        if length == 1:  # one new position sees everything cached
            return AttentionMask(None, causal=False)
        keys = torch.arange(past + length, device=device)
        queries = past + torch.arange(length, device=device)
        return AttentionMask((keys[None, :] <= queries[:, None])[None, None], causal=False)

    def _step_targets(self, num_steps: int | Sequence[int] | Tensor | None, batch: int, length: int,
                      device: torch.device) -> Tensor:
        """Recurrences per position, (B, T) long."""
        steps = torch.as_tensor(self.config.mean_recurrence if num_steps is None else num_steps, dtype=torch.long,
                                device=device)
        if steps.dim() == 0:
            steps = steps.expand(batch, length)
        elif steps.dim() == 1:
            steps = steps[:, None].expand(batch, length)
        if steps.shape != (batch, length):
            raise ValueError(f"num_steps has shape {tuple(steps.shape)}; give an int, ({batch},) or ({batch}, "
                             f"{length})")
        if bool((steps < 1).any()):  # a position without a step would have no core entries for later lookups
            raise ValueError("num_steps must be at least 1")
        return steps


# -- loading ------------------------------------------------------------------------------------------------------


def is_huginn_folder(path: str | Path) -> bool:
    """A local folder whose config.json says model_type huginn_raven."""
    config_file = Path(path) / "config.json"
    try:
        data = json.loads(config_file.read_text()) if config_file.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == HUGINN_MODEL_TYPE


def weight_files(folder: str | Path) -> list[Path]:
    """model.safetensors, or the shards a model.safetensors.index.json names, or every *.safetensors file."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HuginnLoadError(f"no safetensors weights in {folder}")
    return files


def load_huginn_weights(model: HuginnForCausalLM, folder: str | Path, device: torch.device,
                        dtype: torch.dtype) -> None:
    """Read the checkpoint's tensors into `model` (built on the meta device: nothing is allocated twice),
    checking that the names and shapes are exactly the architecture's."""
    from safetensors import safe_open

    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    tied = model.config.tie_embeddings
    if tied:
        expected.pop("lm_head.weight")  # the embedding; a checkpoint that also holds it has it twice
    state: dict[str, Tensor] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name in reader.keys():
                if name.split(".")[-1] in RECOMPUTED_BUFFERS or (tied and name == "lm_head.weight"):
                    continue
                state[name] = reader.get_tensor(name).to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HuginnLoadError(f"weights in {folder} do not match Huginn's layout: missing {missing[:5]} "
                              f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    wrong = [f"{name} {tuple(state[name].shape)} != {tuple(shape)}" for name, shape in expected.items()
             if state[name].shape != shape]
    if wrong:
        raise HuginnLoadError(f"weights in {folder} have the wrong shapes for config.json: {wrong[:5]}")
    if tied:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign replaced the parameters: tie the new ones


def load_huginn(folder: str | Path, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> tuple[HuginnForCausalLM, Any]:
    """(model in eval mode, tokenizer) from a Huginn folder: fp32 on CPU, bf16 on a GPU unless `dtype` says."""
    from transformers import AutoTokenizer

    torch_device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    config = HuginnConfig.from_folder(folder)
    config._name_or_path = str(folder)
    with torch.device("meta"):
        model = HuginnForCausalLM(config)
    load_huginn_weights(model, folder, torch_device, dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def save_huginn(model: HuginnForCausalLM, folder: str | Path) -> None:
    """config.json and model.safetensors in the published layout (the tied head and no freqs_cis stored)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()
               if not (model.config.tie_embeddings and name == "lm_head.weight")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
