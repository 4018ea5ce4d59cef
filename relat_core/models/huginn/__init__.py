"""Huginn (huginn-0125, "raven"): a recurrent-depth decoder, relat_core's own implementation.

Geiping et al., "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach" (arXiv 2502.05171):
a prelude of sandwich blocks embeds each token; a latent state, random or zero at first, is then refined r times by
s <- core(adapter([s, e])); a coda reads the final state. The depth r is a per-call knob (`num_steps`), and each
token may stop early when an exit criterion fires. Architecture, weight names and cache layout follow the published
checkpoint and the reference code of the project seal-rg/recurrent-pretraining (`recpre/raven_modeling_minimal.py`);
the code here is written from them, without transformers' remote code, so that relat can give each request its own
depth and exits and later train through the recurrence.

The parts: config.py (the published config's fields), modules.py (norm, rotary embeddings, attention, MLP, the
sandwich block), cache.py (the per-recurrence KV cache), recurrence.py (per-row depths and the adaptive exits),
model.py (HuginnForCausalLM and its forward) and loading.py (the published folder layout, in and out).

Shapes: B batch rows, T new positions in a call, K cached positions, H heads, D head size, d = n_embd.
"""

from __future__ import annotations

from .cache import HuginnCache, KeysValues
from .config import HUGINN_MODEL_TYPE, HuginnConfig, HuginnLoadError
from .loading import RECOMPUTED_BUFFERS, is_huginn_folder, load_huginn, load_huginn_weights, save_huginn, weight_files
from .model import HuginnForCausalLM, HuginnOutput
from .modules import (
    AttentionMask,
    CausalSelfAttention,
    GatedMLP,
    KeyValueSource,
    RMSNorm,
    Rope,
    SandwichBlock,
    apply_rope,
    rope_angles,
)
from .recurrence import (
    DEFAULT_EXIT_THRESHOLDS,
    EXIT_CRITERIA,
    MAX_RECURRENCE,
    Recurrence,
    RowRecurrence,
    make_exit_criterion,
)

__all__ = [
    "DEFAULT_EXIT_THRESHOLDS",
    "EXIT_CRITERIA",
    "HUGINN_MODEL_TYPE",
    "MAX_RECURRENCE",
    "RECOMPUTED_BUFFERS",
    "AttentionMask",
    "CausalSelfAttention",
    "GatedMLP",
    "HuginnCache",
    "HuginnConfig",
    "HuginnForCausalLM",
    "HuginnLoadError",
    "HuginnOutput",
    "KeyValueSource",
    "KeysValues",
    "RMSNorm",
    "Recurrence",
    "Rope",
    "RowRecurrence",
    "SandwichBlock",
    "apply_rope",
    "is_huginn_folder",
    "load_huginn",
    "load_huginn_weights",
    "make_exit_criterion",
    "rope_angles",
    "save_huginn",
    "weight_files",
]
