"""OpenAI's legacy Completions (`POST /v1/completions`): a request's prompts submitted, and the response and the
stream rendered (their objects are in server/completions_protocol.py).

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
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request as HTTPRequest

from relat_core import Finished, Result, TextDelta, TokenLogprob

from .completions_protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from .disconnect import unless_disconnected
from .errors import ErrorInfo, describe
from .response_models import UsageInfo, new_id, now
from .runner import HEARTBEAT, Job
from .streaming import HEARTBEAT_SECONDS, SSE_HEADERS, data_line


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


async def run_all(jobs: list[Job], request: HTTPRequest) -> list[Result] | None:
    """Every job's result, in order; None if the client disconnected first (the jobs are then cancelled)."""
    async def results() -> list[Result]:
        found: dict[int, Result] = {}
        async for position, event in _merged(jobs):
            if isinstance(event, Finished):
                found[position] = event.result
        return [found[position] for position in range(len(jobs))]

    return await unless_disconnected(results(), request, jobs)


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
