"""The wire format of OpenAI's legacy Completions (`POST /v1/completions`): its request, with the `relat` object of
chat plus `continuations`, and its response and stream objects (server/completions.py renders them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import Ge
from pydantic import BaseModel, Field, WithJsonSchema, create_model

from .protocol import (
    Answers,
    AnswersField,
    Frequency,
    FrequencyField,
    IgnoreEosField,
    LogitBias,
    LogitBiasField,
    ModelField,
    OpenAIBaseModel,
    Presence,
    PresenceField,
    RelatOptions,
    Seed,
    SeedField,
    Stop,
    StopField,
    StreamOptions,
    Temperature,
    TemperatureField,
    TopK,
    TopKField,
    TopP,
    TopPField,
    UsageInfo,
)
from .settings import JSONInteger, TTTOptions, bounded

OPENAI_MAX_TOKENS = 16  # OpenAI's default for a completion's length

# The legacy endpoint's max_tokens may be 0 (the prompt read, nothing written: with echo, its logprobs), as
# OpenAI's is; and at most the context the prompt leaves (checked by the server).
# A JSON integer (2.0 as 2) that is not negative, stated for the document too (a validator before it hides `ge`).
NonNegative = Annotated[JSONInteger, Ge(0), WithJsonSchema({"type": "integer", "minimum": 0})]
CompletionMaxTokens = NonNegative | None
PromptText = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[NonNegative], Field(min_length=1)]
Prompt = PromptText | Annotated[list[PromptText], Field(min_length=1)] | TokenIds | \
    Annotated[list[TokenIds], Field(min_length=1)]
Continuation = Annotated[str, Field(min_length=1)]


class CompletionRelatOptions(RelatOptions):
    """The `relat` extension, as on chat, less what a raw prompt cannot take (agents, which take turns in a chat
    template, and an answer format's instruction), and `continuations`."""

    agents: Literal["single"] | None = Field(None, description="single only: agents take turns in a chat template")
    answer_format: Literal["auto", "text"] | None = Field(
        None, description="auto or text only: a raw prompt is read as it is, with no instruction added")

    continuations: list[Continuation] | None = Field(
        None, min_length=1, description="score these texts as the completion, each forced to its end after the "
                                        "request's one training and thought, instead of writing one: choices[k] is "
                                        "continuation k with its tokens' logprobs (with logprobs); n and max_tokens "
                                        "are not used")


class CompletionRequest(OpenAIBaseModel):
    # In the order of OpenAI's reference; fields it has and we do not serve fall into the logged extras.
    model: str | None = ModelField
    prompt: Prompt = Field(description="a prompt (text, or token ids) or a list of them, read as it is: no chat "
                                       "template")
    best_of: Literal[1] | None = Field(None, description="only 1 (or null): each choice is its own sample; ask for n "
                                                        "and choose among them")
    echo: bool | None = Field(False, description="put the prompt before the completion (and, with logprobs, its "
                                                 "tokens' logprobs, the first null)")
    frequency_penalty: Frequency = FrequencyField
    logit_bias: LogitBias = LogitBiasField
    logprobs: bounded("top_logprobs") | None = Field(
        None, description="each token's logprob and the k likeliest tokens' at its position (0-20), read from the "
                          "distribution the request decoded from (vLLM's raw mode)")
    max_tokens: CompletionMaxTokens = Field(None, description=f"completion length limit in tokens (default "
                                                              f"{OPENAI_MAX_TOKENS}); 0 writes nothing")
    n: Answers = AnswersField
    presence_penalty: Presence = PresenceField
    seed: Seed = SeedField
    stop: Stop = StopField
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: None = Field(None, description="not supported (only null): relat writes left to right, with no text "
                                           "after the completion to meet")
    temperature: Temperature = TemperatureField
    top_p: TopP = TopPField
    user: str | None = None
    top_k: TopK = TopKField
    ignore_eos: bool | None = IgnoreEosField
    relat: CompletionRelatOptions | None = Field(None, description="ReLAT parameters (through the SDK: extra_body)")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a request of its own."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    def sampling_fields(self) -> dict[str, Any]:
        echo_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        return {"max_tokens": OPENAI_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": self.stop, "ignore_eos": self.ignore_eos, "n": self.n,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": self.logit_bias, "logprobs": self.logprobs is not None,
                "top_logprobs": self.logprobs or 0, "prompt_logprobs": echo_logprobs}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def completion_request_model(limits: dict[str, int], answers: int) -> type[CompletionRequest]:
    """The request class of a server with these limits (as protocol.request_models narrows chat's): its TTT fields
    bounded by the server's settings, n and the continuations by its most answers per request."""
    narrowed: dict[str, Any] = {
        name: (bounded(name, limit) | None, Field(None, description=TTTOptions.model_fields[name].description))
        for name, limit in limits.items()}
    continuations = CompletionRelatOptions.model_fields["continuations"]
    options = create_model("CompletionRelatOptions", __base__=CompletionRelatOptions,
                           __doc__=CompletionRelatOptions.__doc__, __module__=__name__, **narrowed,
                           continuations=(list[Continuation] | None,
                                          Field(None, min_length=1, max_length=answers,
                                                description=continuations.description)))
    relat = CompletionRequest.model_fields["relat"]
    return create_model("CompletionRequest", __base__=CompletionRequest, __doc__=CompletionRequest.__doc__,
                        __module__=__name__, relat=(options | None, Field(None, description=relat.description)),
                        n=(bounded("n", answers) | None, AnswersField))


# -- responses ----------------------------------------------------------------------------------------------------

class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: one entry per token of the choice's text (the prompt's first, with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the prompt's first token")
    top_logprobs: list[dict[str, float] | None] = Field(description="the token's own and the k likeliest tokens' "
                                                                    "logprobs at each position; null for the first")
    text_offset: list[int] = Field(description="where each token's text starts in the prompt and completion")


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: None = None
    relat: dict[str, Any] = Field(description="the trace of the first prompt's request (with every prompt's in "
                                              "prompt_traces when there are several), and ignored_fields")


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: None = None
    usage: UsageInfo | None = Field(None, description="null except in the usage chunk, when asked for")
    relat: dict[str, Any] | None = Field(None, description="the trace, on each prompt's last finishing chunk")
