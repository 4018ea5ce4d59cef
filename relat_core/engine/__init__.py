"""The engine (issue 25 split it into one module a phase, after vLLM v1's scheduler and model runner):

- scheduler.py: `Engine`, which admits requests and decides which rows run which phase each step;
- gating.py, training.py, thinking.py, answering.py: the phases (`Gate`, `Trainer`, `Thinker`, `Answerer`), each
  given its rows;
- rows.py: the rows they pass between them; context.py: what they share (the model, slot binding, the forwards
  more than one phase runs); events.py: a request, the events and its result; defaults.py: the defaults.

Every name callers imported from `relat_core.engine` before the split is importable from here still.
"""

from ..params import InvalidParameter, SamplingParams, TTTParams
from .defaults import DEFAULT_ADAPTER_SEED, default_ttt_params, recurrence_defaults
from .events import (
    AgentDone,
    Choice,
    EngineBusy,
    Event,
    Failed,
    Finished,
    Request,
    Result,
    TextDelta,
    TokenLogprob,
    Trace,
    TrainStep,
    Usage,
)
from .rows import Piece, _owner, _Plain, _Sequence
from .scheduler import Engine

__all__ = [
    "DEFAULT_ADAPTER_SEED", "AgentDone", "Choice", "Engine", "EngineBusy", "Event", "Failed", "Finished",
    "InvalidParameter", "Piece", "Request", "Result", "SamplingParams", "TTTParams", "TextDelta", "TokenLogprob",
    "Trace", "TrainStep", "Usage", "_Plain", "_Sequence", "_owner", "default_ttt_params", "recurrence_defaults",
]
