"""OpenAI's legacy Completions (`POST /v1/completions`): its request and response objects, and their rendering.

A raw prompt (no chat template; the whole of it is the question relat rebuilds) or a list of them, each a request
of its own, submitted together so that the engine batches them; choices are indexed prompt-major, as OpenAI does
(index = prompt_i * n + k). `echo` puts the prompt before the completion, and with `logprobs` its tokens' logprobs
(the first null): with `max_tokens: 0` (or 1, as lm-eval's `local-completions` sends) that is a loglikelihood
request. The `relat` object means what it means on chat, and takes one more field here, `continuations`: texts
scored as the completion after the request's one training and thought (relat_core/engine/completion.py), which
`relat eval --mc-scoring loglik` uses to score every option of a question with one adapter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from annotated_types import Ge
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, WithJsonSchema, create_model
from starlette.requests import Request as HTTPRequest

from relat_core import Finished, Result, TextDelta, TokenLogprob

from .errors import ErrorInfo, describe
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
    new_id,
    now,
)
from .runner import HEARTBEAT, Job
from .settings import JSONInteger, TTTOptions, bounded
from .streaming import HEARTBEAT_SECONDS, SSE_HEADERS, data_line

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


def _logprobs(entries: list[TokenLogprob | None], offset: int) -> CompletionLogprobs:
    """Token entries (None: a prompt's first token) in the legacy shape, their text offsets from `offset`."""
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for entry in entries:
        logprobs.text_offset.append(offset)
        if entry is None:
            logprobs.tokens.append("")
            logprobs.token_logprobs.append(None)
            logprobs.top_logprobs.append(None)
            continue
        logprobs.tokens.append(entry.text)
        logprobs.token_logprobs.append(entry.logprob)
        logprobs.top_logprobs.append({entry.text: entry.logprob, **dict(entry.top)})
        offset += len(entry.text)
    return logprobs


class Prompted:
    """One prompt's request: its text, and how its result becomes the response's choices."""

    def __init__(self, prompt: str | list[int], position: int, body: CompletionRequest, tokenizer: Any):
        self.position = position
        self.echo = bool(body.echo)
        self.logprobs = body.logprobs is not None
        self.text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
        self.tokenizer = tokenizer

    def index(self, choice: int, per_prompt: int) -> int:
        return self.position * per_prompt + choice

    def _prompt_logprobs(self, result: Result) -> CompletionLogprobs:
        """The prompt's tokens and their logprobs (the first null), offsets from 0."""
        ids = result.prompt_token_ids
        entries = result.prompt_logprobs or [None] * len(ids)
        logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        offset = 0
        for token, entry in zip(ids, entries, strict=True):
            text = entry.text if entry is not None else self.tokenizer.decode([token])
            logprobs.tokens.append(text)
            logprobs.text_offset.append(offset)
            logprobs.token_logprobs.append(None if entry is None else entry.logprob)
            logprobs.top_logprobs.append(None if entry is None else {entry.text: entry.logprob, **dict(entry.top)})
            offset += len(text)
        return logprobs

    def choice_logprobs(self, result: Result, entries: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if not self.logprobs:
            return None
        answer = _logprobs(entries or [], len(self.text))
        if not self.echo:
            return answer
        prompt = self._prompt_logprobs(result)
        return CompletionLogprobs(tokens=prompt.tokens + answer.tokens,
                                  token_logprobs=prompt.token_logprobs + answer.token_logprobs,
                                  top_logprobs=prompt.top_logprobs + answer.top_logprobs,
                                  text_offset=prompt.text_offset + answer.text_offset)

    def choices(self, result: Result, per_prompt: int) -> list[CompletionChoice]:
        prefix = self.text if self.echo else ""
        return [CompletionChoice(text=prefix + choice.text, index=self.index(choice.index, per_prompt),
                                 logprobs=self.choice_logprobs(result, choice.logprobs),
                                 finish_reason=choice.finish_reason)
                for choice in result.choices]


def _usage(results: list[Result]) -> UsageInfo:
    prompt = sum(result.usage.prompt_tokens for result in results)
    completion = sum(result.usage.completion_tokens for result in results)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _trace(results: list[Result], ignored: list[str]) -> dict[str, Any]:
    trace = {**results[0].trace.to_dict(), "ignored_fields": ignored}
    if len(results) > 1:
        trace["prompt_traces"] = [result.trace.to_dict() for result in results]
    return trace


def completion_response(results: list[Result], prompted: list[Prompted], fields: dict, per_prompt: int,
                        ignored: list[str]) -> CompletionResponse:
    choices = [choice for result, prompt in zip(results, prompted, strict=True)
               for choice in prompt.choices(result, per_prompt)]
    return CompletionResponse(**fields, choices=choices, usage=_usage(results), relat=_trace(results, ignored))


# -- running a request's prompts ------------------------------------------------------------------------------------

async def _merged(jobs: list[Job]) -> AsyncIterator[tuple[int, object]]:
    """Every job's events as they come, tagged with the job's position; a job's error is raised."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, job: Job) -> None:
        try:
            async for event in job.events(heartbeat=HEARTBEAT_SECONDS):
                await queue.put((position, event))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((position, error))
        await queue.put((position, done))

    tasks = [asyncio.ensure_future(pump(position, job)) for position, job in enumerate(jobs)]
    running = len(jobs)
    try:
        while running:
            position, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        for job in jobs:
            job.cancel()


async def _disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_all(jobs: list[Job], request: HTTPRequest) -> list[Result] | None:
    """Every job's result, in order; None if the client disconnected first (the jobs are then cancelled)."""
    async def results() -> list[Result]:
        found: dict[int, Result] = {}
        async for position, event in _merged(jobs):
            if isinstance(event, Finished):
                found[position] = event.result
        return [found[position] for position in range(len(jobs))]

    finished = asyncio.ensure_future(results())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        return finished.result() if finished.done() else None
    finally:
        finished.cancel()
        gone.cancel()
        for job in jobs:
            job.cancel()


class CompletionStream:
    """The text_completion chunk stream: each text delta as a chunk of its choice; with echo, the prompt first
    (with echo and logprobs, a choice's chunks come once its prompt's logprobs are known: at its end)."""

    def __init__(self, fields: dict, prompted: list[Prompted], per_prompt: int, include_usage: bool,
                 ignored: list[str]):
        self.fields = fields
        self.prompted = prompted
        self.per_prompt = per_prompt
        self.include_usage = include_usage
        self.ignored = ignored
        self.results: dict[int, Result] = {}
        self.offsets: dict[int, int] = {}  # by choice index: where its next token's text starts

    def _chunk(self, choices: list[CompletionChoice], trace: dict | None = None) -> str:
        return data_line(CompletionChunk(**self.fields, choices=choices, relat=trace).model_dump_json())

    def _held(self, prompt: Prompted) -> bool:
        return prompt.echo and prompt.logprobs

    def start(self) -> str:
        return "".join(self._chunk([CompletionChoice(text=prompt.text, index=prompt.index(k, self.per_prompt),
                                                     finish_reason=None)])
                       for prompt in self.prompted if prompt.echo and not prompt.logprobs
                       for k in range(self.per_prompt))

    def event(self, position: int, event: object) -> str:
        prompt = self.prompted[position]
        if isinstance(event, TextDelta) and not self._held(prompt):
            index = prompt.index(event.index, self.per_prompt)
            logprobs = None
            if prompt.logprobs:
                offset = self.offsets.get(index, len(prompt.text))
                logprobs = _logprobs(event.logprobs or [], offset)
                self.offsets[index] = offset + sum(len(entry.text) for entry in event.logprobs or [])
            return self._chunk([CompletionChoice(text=event.text, index=index, logprobs=logprobs,
                                                 finish_reason=None)])
        if not isinstance(event, Finished):
            return ""  # training steps and agents: the chunk stream has no place for them
        result = event.result
        self.results[position] = result
        text = ""
        last = len(result.choices) - 1
        trace = {**result.trace.to_dict(), "ignored_fields": self.ignored}
        for choice in result.choices:
            index = prompt.index(choice.index, self.per_prompt)
            if self._held(prompt):  # the whole choice, its prompt first, now that the prompt's logprobs are known
                whole = prompt.choices(result, self.per_prompt)[choice.index]
                text += self._chunk([CompletionChoice(text=whole.text, index=index, logprobs=whole.logprobs,
                                                      finish_reason=None)])
            text += self._chunk([CompletionChoice(text="", index=index, finish_reason=choice.finish_reason)],
                                trace if choice.index == last else None)
        return text

    def end(self) -> str:
        text = ""
        if self.include_usage and len(self.results) == len(self.prompted):
            usage = CompletionChunk(**self.fields, choices=[], usage=_usage(list(self.results.values())))
            text += data_line(usage.model_dump_json())
        return text + data_line("[DONE]")


async def stream(jobs: list[Job], renderer: CompletionStream, on_error) -> AsyncIterator[str]:
    try:
        yield renderer.start()
        async for position, event in _merged(jobs):
            yield ": keep-alive\n\n" if event is HEARTBEAT else renderer.event(position, event)
        yield renderer.end()
    except Exception as error:  # CancelledError (the client left) is not an Exception: it passes through
        info: ErrorInfo = describe(error)
        on_error(info)
        yield data_line(info.json()) + data_line("[DONE]")
    finally:
        for job in jobs:
            job.cancel()


async def respond(service: Any, request: HTTPRequest, body: CompletionRequest) -> Response:
    """Submit each prompt as a request (together, so that the engine batches them), then answer as OpenAI does."""
    relat = body.relat
    prompts = body.prompts()
    sampling = body.sampling_fields()
    continuations = relat.continuations if relat else None
    jobs: list[Job] = []
    try:
        for i, prompt in enumerate(prompts):
            jobs.append(service.submit(
                f"{request.state.request_id}" + (f"/{i}" if len(prompts) > 1 else ""), [],
                relat.ttt_fields() if relat else {}, sampling, relat.timeout if relat else None, ttt_prefix="relat.",
                max_tokens_param="max_tokens", return_adapter=bool(relat and relat.return_adapter), prompt=prompt,
                continuations=continuations, max_tokens_sent=body.max_tokens is not None,
                tenant=request.state.tenant, cache_salt=relat.cache_salt if relat else None,
                record=request.state.access))
    except Exception:  # a prompt refused (400, 413, 429): the ones queued before it are withdrawn
        for job in jobs:
            job.cancel()
        raise
    per_prompt = len(continuations) if continuations else body.n or 1
    prompted = [Prompted(prompt, i, body, service.tokenizer) for i, prompt in enumerate(prompts)]
    fields = {"id": new_id("cmpl"), "created": now(), "model": service.model_name}
    ignored = sorted(body.model_extra or {})
    if body.stream:
        renderer = CompletionStream(fields, prompted, per_prompt, body.include_usage, ignored)
        return StreamingResponse(stream(jobs, renderer, service.count_error), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    results = await run_all(jobs, request)
    if results is None:
        return Response(status_code=499)
    return JSONResponse(completion_response(results, prompted, fields, per_prompt, ignored).model_dump())
