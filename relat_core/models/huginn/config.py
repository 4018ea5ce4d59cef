"""Huginn's configuration: the fields of the published `raven_config_minimal.json` and the variants implemented.

The field names and defaults are huginn-0125's (Geiping et al., "Scaling up Test-Time Compute with Latent Reasoning:
A Recurrent Depth Approach", arXiv 2502.05171; config and reference code in the project seal-rg/recurrent-pretraining).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

HUGINN_MODEL_TYPE = "huginn_raven"

# What the published config calls some fields, and what this config calls them.
_CONFIG_ALIASES = {"n_heads": "num_attention_heads", "hidden_size": "n_embd"}
# Block variants this package implements; a config naming another would silently compute something else.
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
