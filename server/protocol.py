"""The wire format: OpenAI's Chat Completions objects field by field, the `relat` extension, the native endpoint.

OpenAI's requests accept unknown top-level fields, log them and list them in the response's trace
(`ignored_fields`: an SDK newer than the server must keep working, and a client must see what was not served);
the `relat` object and the native request, whose fields are ours, refuse them. Each field's type is taken
strictly, as OpenAI does ("5" is not an integer); bounds live in the field types so that a bad value is a 400
naming its field. The numeric bounds come from relat_core/params.py through `bounded` (server/bounded_fields.py),
and a server's limits narrow them in its own request classes (`request_models`): the server validates with the
classes its OpenAPI document is generated from, so the document is the API. `engine_request` is the one place that
turns a request into engine parameters. What the server sends back (responses, stream chunks and events, probes,
the model list) is server/response_models.py's, re-exported here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_validator

from relat_core import InvalidParameter, Request, SamplingParams, TTTParams
from relat_core.params import LOGIT_BIAS, MAX_LOGIT_BIAS

from .bounded_fields import bounded, invalid
from .logprobs import ChoiceLogprobs, choice_logprobs  # noqa: F401 (re-exported)

# Re-exported: the response side of the wire format was declared here before it had a module of its own.
from .response_models import (  # noqa: F401
    AdminStatus,
    AgentTurn,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    DeltaMessage,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    RelatChoice,
    RelatResponse,
    TokenEvent,
    TrainStepEvent,
    UsageInfo,
    new_id,
    now,
)
from .tools import ChatTool, ResponseFormat, ToolCallParam, ToolChoice
from .ttt_options import TTTOptions

log = logging.getLogger("relat_server")

# What OpenAI does when a request leaves a sampling field out and the server sets no default.
OPENAI_SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> OpenAIBaseModel:
        if self.model_extra:
            log.info("%s: ignoring unknown fields %s", type(self).__name__, ", ".join(sorted(self.model_extra)))
        return self


# -- fields shared by the chat and native requests (llama-cpp-python style) -----------------------------------

StopField = Field(None, description="up to 4 strings that end the answer (not included in it)")
StopString = Annotated[str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None
MaxTokens = bounded("max_tokens") | None  # and at most the context left after the prompt (checked by the server)
Temperature = bounded("temperature") | None
TemperatureField = Field(None, description="0 is greedy; default 1 (or the server's)")
TopP = bounded("top_p") | None
TopPField = Field(None, description="nucleus sampling mass; default 1 (or the server's)")
TopK = bounded("top_k") | None
TopKField = Field(None, description="sample among the k likeliest tokens; 0 disables (vLLM's extension)")
Seed = bounded("seed") | None
SeedField = Field(None, description="same seed, same answer; also seeds the adapter's initialisation")
IgnoreEosField = Field(None, description="keep decoding past end-of-sequence tokens (vLLM's extension)")
ModelField = Field(None, description="the served model's name (GET /v1/models); may be left out")
Presence = bounded("presence_penalty") | None
Frequency = bounded("frequency_penalty") | None
PresenceField = Field(None, description="lowers a token's logit once if the answer has it already (OpenAI's); -2..2")
FrequencyField = Field(None, description="lowers a token's logit per time the answer has it already (OpenAI's); "
                                         "-2..2")


def _check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    if value is None:
        return None
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    for key, bias in value.items():
        if not key.isdigit():
            raise invalid(f"logit_bias keys must be token ids (decimal integers), got {key!r}")
        if not LOGIT_BIAS.holds(bias):
            raise invalid(f"logit_bias values must be in [-100, 100], got {bias!r} for token {key}")
    return value


LOGIT_BIAS_SCHEMA = {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "maxProperties": MAX_LOGIT_BIAS,
                     "additionalProperties": LOGIT_BIAS.json_schema()}
LogitBias = Annotated[dict[str, float] | None, AfterValidator(_check_logit_bias),
                      WithJsonSchema({"anyOf": [LOGIT_BIAS_SCHEMA, {"type": "null"}]})]
TopLogprobs = bounded("top_logprobs") | None
LogprobsField = Field(None, description="return each answer token's logprob (choices[].logprobs.content), read from "
                                        "the distribution the request decoded from, before penalties and "
                                        "temperature (vLLM's raw mode)")
TopLogprobsField = Field(None, description="also the k likeliest tokens' logprobs at each position (0-20; needs "
                                           "logprobs)")
LogitBiasField = Field(None, description="token id (as a string) -> a bias in [-100, 100] added to its logit "
                                         "(OpenAI's); at most 300 entries")
Answers = bounded("n") | None  # and at most the server's max_n (request_models)
AnswersField = Field(None, description="answers to sample after one training and one thought (choices 0..n-1, "
                                       "answer k drawn from seed + k); default 1")


# -- requests -------------------------------------------------------------------------------------------------

class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = Field(None, description="an assistant turn's tool calls")
    tool_call_id: str | None = Field(None, description="a tool result: the call it answers")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class RelatOptions(OpenAIBaseModel, TTTOptions):
    """The `relat` extension: per-request TTT parameters (the fields of TTTOptions) and the request's deadline.

    A field left out or null takes the server's default, as OpenAI's fields do. The API is ours, so an unknown
    field is a 400 that names it (with the closest known name: errors.py), not a typo answered at the defaults;
    the native request, which subclasses this, is as strict.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    timeout: float | None = Field(None, gt=0, description="deadline in seconds, at most the server's")
    return_adapter: bool | None = Field(
        None, description="keep the trained adapter (method relat, steps >= 1): the trace's adapter.url serves it "
                          "as a zip of PEFT's files for a while")
    cache_salt: str | None = Field(
        None, min_length=1, max_length=256, description="partitions the adapter cache within your tenant (vLLM's "
                                                        "name): only requests with the same salt share adapters")


class ChatCompletionRequest(OpenAIBaseModel):
    # In the order of OpenAI's reference; fields it has and we do not serve fall into the logged extras.
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = ModelField
    max_completion_tokens: MaxTokens = Field(None, description="answer length limit in tokens")
    max_tokens: MaxTokens = Field(None, deprecated="max_tokens is deprecated: use max_completion_tokens")
    n: Answers = AnswersField
    seed: Seed = SeedField
    stop: Stop = StopField
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Temperature = TemperatureField
    top_p: TopP = TopPField
    user: str | None = None
    presence_penalty: Presence = PresenceField
    frequency_penalty: Frequency = FrequencyField
    logit_bias: LogitBias = LogitBiasField
    logprobs: bool | None = LogprobsField
    top_logprobs: TopLogprobs = TopLogprobsField
    top_k: TopK = TopKField
    ignore_eos: bool | None = IgnoreEosField
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema: the "
                                                   "answer constrained to that JSON (xgrammar)")
    tools: list[ChatTool] | None = Field(None, min_length=1, description="function tools, written into the prompt "
                                         "by the chat template (a 400 on a template without tool support)")
    tool_choice: ToolChoice | None = Field(None, description="none, auto (the default with tools: calls parsed "
                                           "from the reply), required, or a named function (both enforced by the "
                                           "grammar)")
    parallel_tool_calls: bool | None = Field(None, description="false: one tool call at most (default true)")
    relat: RelatOptions | None = Field(None, description="ReLAT parameters (through the SDK: extra_body)")

    def sampling_fields(self) -> dict[str, Any]:
        with warnings.catch_warnings():  # the deprecation is for clients; reading the field is our job
            warnings.simplefilter("ignore", DeprecationWarning)
            limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return {"max_tokens": limit, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "stop": self.stop, "ignore_eos": self.ignore_eos, "n": self.n,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": self.logit_bias, "logprobs": self.logprobs, "top_logprobs": self.top_logprobs}

    @property
    def max_tokens_param(self) -> str:
        """The field that set the answer's length, as errors name it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class RelatRequest(RelatOptions):
    """POST /v1/relat: one question; TTT fields at the top level."""

    question: str = Field(min_length=1, pattern=r"\S", description="the question (not blank)")
    system: str | None = Field(None, description="an optional system message")
    model: str | None = ModelField
    stream: bool | None = Field(False, description="typed SSE events: ttt_step, agent, token, done")
    max_tokens: MaxTokens = Field(None, description="answer length limit in tokens")
    temperature: Temperature = TemperatureField
    top_p: TopP = TopPField
    top_k: TopK = TopKField
    seed: Seed = SeedField
    stop: Stop = StopField
    ignore_eos: bool | None = IgnoreEosField
    n: Answers = AnswersField
    presence_penalty: Presence = PresenceField
    frequency_penalty: Frequency = FrequencyField
    logit_bias: LogitBias = LogitBiasField
    logprobs: bool | None = LogprobsField
    top_logprobs: TopLogprobs = TopLogprobsField
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema: the "
                                                   "answer constrained to that JSON (xgrammar)")

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{"role": "user", "content": self.question}]

    def sampling_fields(self) -> dict[str, Any]:
        return self.model_dump(include={"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
                                        "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                                        "top_logprobs"})


@dataclass(frozen=True)
class RequestModels:
    """One server's request classes: the TTT fields in LIMITS bounded by its settings as well as by TTTParams."""

    chat: type[ChatCompletionRequest]
    native: type[RelatRequest]
    completions: type[BaseModel]  # server/completions_protocol.py's CompletionRequest, narrowed the same way


def request_models(limits: dict[str, int], answers: int) -> RequestModels:
    """The request classes of a server with these limits (Settings.limits) and this most answers per request (n).
    They keep the names of the classes they narrow, so that the OpenAPI document names them as the API does."""
    narrowed: dict[str, Any] = {
        name: (bounded(name, limit) | None, Field(None, description=TTTOptions.model_fields[name].description))
        for name, limit in limits.items()}
    n = (bounded("n", answers) | None, AnswersField)
    options = create_model("RelatOptions", __base__=RelatOptions, __doc__=RelatOptions.__doc__,
                           __module__=__name__, **narrowed)
    relat_field = ChatCompletionRequest.model_fields["relat"]
    chat = create_model("ChatCompletionRequest", __base__=ChatCompletionRequest, __doc__=ChatCompletionRequest.__doc__,
                        __module__=__name__, relat=(options | None, Field(None, description=relat_field.description)),
                        n=n)
    native = create_model("RelatRequest", __base__=RelatRequest, __doc__=RelatRequest.__doc__, __module__=__name__,
                          **narrowed, n=n)
    from .completions_protocol import completion_request_model  # it builds on this module's fields

    return RequestModels(chat, native, completion_request_model(limits, answers))


# -- request -> engine ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerDefaults:
    ttt: TTTParams  # the engine's default for the model, with the operator's settings applied
    sampling: dict[str, Any]  # the operator's sampling settings (max_tokens always)


def engine_request(messages: list[dict], ttt_fields: dict[str, Any], sampling_fields: dict[str, Any],
                   defaults: ServerDefaults, ttt_prefix: str = "", return_adapter: bool = False) -> Request:
    """Engine parameters with the precedence: the request, then the server's default, then OpenAI's.

    `ttt_prefix` is where the TTT fields sit in the request ("relat." in chat), so that errors name them as sent.
    """
    try:
        ttt = defaults.ttt.replace(**ttt_fields)
    except InvalidParameter as error:
        raise InvalidParameter(ttt_prefix + error.param, str(error)) from None
    sent = {k: v for k, v in sampling_fields.items() if v is not None}  # null means "the default" in OpenAI's API
    if isinstance(sent.get("stop"), str):
        sent["stop"] = [sent["stop"]]
    if "stop" in sent:
        sent["stop"] = tuple(sent["stop"])
    if "logit_bias" in sent:  # JSON's keys are strings; checked as decimal token ids by the request model
        sent["logit_bias"] = {int(token): bias for token, bias in sent["logit_bias"].items()}
    sampling = SamplingParams(**{**OPENAI_SAMPLING_DEFAULTS, **defaults.sampling, **sent})
    if ttt.logprob_shift and not sampling.logprobs and "logprob_shift" not in ttt_fields:
        ttt = ttt.replace(logprob_shift=False)  # the server's default: it shifts the requests that ask for logprobs
    return Request(messages, ttt, sampling, return_adapter)
