"""The wire format of what the server sends: the chat and native responses, OpenAI's stream chunks, the native
stream's events, the probes and the model list (server/protocol.py holds the requests, and re-exports these).

The fields marked `exclude_if=_none` are left out of the JSON when null.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from .logprobs import ChoiceLogprobs
from .tools import DeltaToolCall, ToolCall


def _none(value: object) -> bool:
    return value is None


# -- responses ------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: None = None
    relat: dict[str, Any] = Field(description="the trace: losses per step, phase timings")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_none)
    content: str | None = Field(None, exclude_if=_none)
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=_none)


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = Field(None, description="null except in the usage chunk, when asked for")
    relat: dict[str, Any] | None = Field(None, exclude_if=_none, description="the trace, on the finishing chunk")


class RelatChoice(BaseModel):
    index: int
    answer: str
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = Field(None, exclude_if=_none, description="with logprobs: true")


class RelatResponse(BaseModel):
    id: str
    object: Literal["relat.result"] = "relat.result"
    created: int
    model: str
    answer: str = Field(description="the first answer (choices[0], when n > 1)")
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = Field(None, exclude_if=_none,
                                            description="the first answer's token logprobs, with logprobs: true")
    choices: list[RelatChoice] | None = Field(None, exclude_if=_none, description="every answer, when n > 1")
    usage: UsageInfo = Field(description="completion_tokens: of every answer")
    trace: dict[str, Any]


# -- the native stream's events (the `done` event is a RelatResponse, `error` a StreamError) ---------------------

class TrainStepEvent(BaseModel):
    """`ttt_step`: a finished training step of the adapter."""

    step: int = Field(description="1-based")
    steps: int
    loss: float = Field(description="the training objective's loss before this step's update (the reconstruction's "
                                    "unless the request's objective says otherwise; the trace's objective names it)")
    grad_norm: float | None = Field(description="null when the step stopped training (stop_loss) before an update")
    seconds: float


class AgentTurn(BaseModel):
    """`agent`: an agent of a multi-agent request finished its turn (as in the trace's agent_turns)."""

    role: str
    label: str
    kind: Literal["text", "latent", "answer"]
    prompt_tokens: int
    latent_positions: int
    completion_tokens: int
    seconds: float
    text: str | None = Field(None, exclude_if=_none, description="what a TextMAS agent wrote")


class TokenEvent(BaseModel):
    """`token`: a piece of the answer's text."""

    text: str
    index: int = Field(0, description="which answer (n > 1)")
    logprobs: ChoiceLogprobs | None = Field(None, exclude_if=_none,
                                            description="the tokens this text completes, with logprobs: true")


# -- probes and models ------------------------------------------------------------------------------------------

class Health(BaseModel):
    status: Literal["ok", "failed"]


class Readiness(BaseModel):
    status: Literal["loading", "ready", "draining", "failed"]


class AdminStatus(BaseModel):
    """GET /admin/status: what a soak or an operator checks after load, that nothing leaked and nothing changed."""

    phase: Literal["ready", "draining"]
    base_weights_sha256: str = Field(description="SHA-256 of the base model's parameters and buffers, now")
    base_weights_sha256_at_start: str = Field(description="the same, computed once the model was loaded")
    base_weights_unchanged: bool
    weights: Literal["fp32", "int8", "int4"] = Field(
        description="the format the frozen linear layers are stored in (--weights; auto resolved at load)")
    adapter_slots: int = Field(description="adapter slots of the engine (max_concurrency)")
    adapter_slots_in_use: int
    requests_running: int
    requests_waiting: int
    resident_memory_bytes: int | None = Field(
        description="the server process's resident set, once the C allocator returned its free pages; null off Linux")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "relat"
    # Extensions, as vLLM adds max_model_len: what a client needs to know to ask this model for depth.
    family: str = Field(description="the architecture: its config's model_type (qwen3, llama, ...), or huginn for "
                                    "a recurrent-depth model")
    max_model_len: int | None = Field(None, description="context length in tokens, prompt plus answer")
    num_steps: int | None = Field(None, description="recurrent-depth models: the default recurrences per position")
    max_num_steps: int | None = Field(None, description="recurrent-depth models: the most a request may ask for")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
