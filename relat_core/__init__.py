"""relat_core: ReLAT, reconstruction-guided latent reasoning with per-request test-time training (no HTTP)."""

from .engine import (
    Engine,
    EngineBusy,
    Event,
    Finished,
    Request,
    Result,
    TextDelta,
    Trace,
    TrainStep,
    Usage,
    default_ttt_params,
)
from .loading import EMBEDDED_MODEL, LoadedModel, ModelLoadError, load_model, prepare
from .params import InvalidParameter, SamplingParams, TTTParams

__all__ = [
    "EMBEDDED_MODEL", "Engine", "EngineBusy", "Event", "Finished", "InvalidParameter", "LoadedModel",
    "ModelLoadError", "Request", "Result", "SamplingParams", "TTTParams", "TextDelta", "Trace", "TrainStep", "Usage",
    "default_ttt_params", "load_model", "prepare",
]
