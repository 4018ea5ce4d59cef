"""relat_core's own model implementations, for architectures that transformers has no class for.

Imported lazily by `relat_core.loading` (only when a folder's config names one of them).
"""

from __future__ import annotations

from .huginn import (
    HUGINN_MODEL_TYPE,
    HuginnCache,
    HuginnConfig,
    HuginnForCausalLM,
    HuginnLoadError,
    HuginnOutput,
    is_huginn_folder,
    load_huginn,
)

__all__ = ["HUGINN_MODEL_TYPE", "HuginnCache", "HuginnConfig", "HuginnForCausalLM", "HuginnLoadError", "HuginnOutput",
           "is_huginn_folder", "load_huginn"]
