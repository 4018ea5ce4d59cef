"""relat_core: ReLAT, reconstruction-guided latent reasoning with per-request test-time training (no HTTP).

Names are exported lazily (PEP 562): `relat_core.params` and the CLI's argument parsing stay free of torch, which
matters for `relat ask --url`, a thin client.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AgentDone": "engine", "Engine": "engine", "EngineBusy": "engine", "Event": "engine", "Finished": "engine",
    "Choice": "engine", "Request": "engine", "Result": "engine", "TextDelta": "engine", "TokenLogprob": "engine",
    "Trace": "engine", "TrainStep": "engine", "Usage": "engine",
    "default_ttt_params": "engine",
    "EMBEDDED_MODEL": "loading", "LoadedModel": "loading", "ModelLoadError": "loading", "load_model": "loading",
    "prepare": "loading", "weights_digest": "loading",
    "AgentPrompts": "agents",
    "AdapterCache": "adapter_cache",
    "InvalidParameter": "params", "SamplingParams": "params", "TTTParams": "params",
}
__all__ = sorted(_EXPORTS)

def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
