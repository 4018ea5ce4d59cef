"""From a job's engine events to HTTP: Server-Sent Events for streams, one result for everything else.

Chat streams follow OpenAI (`data: {chunk}` lines, a role chunk first, `data: [DONE]` last); training steps and
finished agents go out as SSE comment lines, which clients ignore and proxies count as traffic. The native stream
sends typed events (`ttt_step`, `agent`, `token`, `done`). Whatever ends a stream early, the job is cancelled on
the way out, so a client that disconnects stops its work at the next step or token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

from pydantic import BaseModel
from starlette.requests import Request as HTTPRequest

from relat_core import AgentDone, Finished, Result, TextDelta, TrainStep

from .disconnect import unless_disconnected
from .errors import ErrorInfo, StreamError, describe
from .logprobs import ChoiceLogprobs, choice_logprobs
from .response_models import (
    AgentTurn,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    DeltaMessage,
    RelatChoice,
    RelatResponse,
    TokenEvent,
    TrainStepEvent,
    UsageInfo,
)
from .runner import HEARTBEAT, Job
from .tools import ToolStream, ToolUse, parse_reply

HEARTBEAT_SECONDS = 10.0  # well under the idle timeouts of common proxies (nginx: 60 s)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: pass each event through at once

# What a job's stream carries up to its end (a Failed event reaches the stream as the job's error).
StreamEvent = TrainStep | AgentDone | TextDelta | Finished


def usage_of(result: Result) -> UsageInfo:
    return UsageInfo(prompt_tokens=result.usage.prompt_tokens, completion_tokens=result.usage.completion_tokens,
                     total_tokens=result.usage.total_tokens)


def data_line(payload: str) -> str:
    return f"data: {payload}\n\n"


def typed_event(name: str, payload: BaseModel) -> str:
    """A native stream's event; each payload is the model that the OpenAPI document names for its event."""
    return f"event: {name}\ndata: {json.dumps(payload.model_dump())}\n\n"


def agent_comment(turn: dict) -> str:
    """An agent's finished turn as one SSE comment line (no text: it may hold newlines, which would end it)."""
    if turn["kind"] == "latent":
        work = f"{turn['latent_positions']} latent positions"
    else:
        work = f"{turn['completion_tokens']} tokens"
    return f": agent {turn['role']} done ({turn['kind']}, {work}, {turn['seconds']:.2f} s)\n\n"


class ChatRenderer:
    """OpenAI's chat.completion.chunk stream."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool,
                 ignored_fields: list[str] | None = None, tool_use: ToolUse | None = None):
        self.fields = {"id": completion_id, "created": created, "model": model}
        self.include_usage = include_usage
        self.ignored_fields = ignored_fields or []  # the request's top-level fields this server does not serve
        self.tool_use = tool_use
        self.tool_streams: dict[int, ToolStream] = {}  # by answer: its text read for tool calls
        self.pending_logprobs: dict[int, list] = {}  # by answer: logprobs of text held back by its tool stream

    def _chunk(self, delta: DeltaMessage, finish_reason: str | None = None, trace: dict | None = None,
               index: int = 0, logprobs: ChoiceLogprobs | None = None) -> str:
        choice = ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        return data_line(ChatCompletionChunk(**self.fields, choices=[choice], relat=trace).model_dump_json())

    def start(self) -> str:
        return self._chunk(DeltaMessage(role="assistant", content=""))

    def event(self, event: StreamEvent) -> str:
        if isinstance(event, TrainStep):
            return f": ttt step {event.step}/{event.steps} loss {event.loss:.4f}\n\n"
        if isinstance(event, AgentDone):
            return agent_comment(event.turn)
        if isinstance(event, TextDelta):
            if self.tool_use is not None:
                stream = self.tool_streams.setdefault(event.index, ToolStream(self.tool_use))
                return self._tool_chunks(event.index, stream.feed(event.text), event.logprobs)
            return self._chunk(DeltaMessage(content=event.text), index=event.index,
                               logprobs=choice_logprobs(event.logprobs))
        result = event.result
        # Each answer's finishing chunk; the trace (one training for all of them) rides on the last.
        last = len(result.choices) - 1
        trace = {**result.trace.to_dict(), "ignored_fields": self.ignored_fields}
        text = ""
        for choice in result.choices:
            finish_reason = choice.finish_reason
            if self.tool_use is not None:
                stream = self.tool_streams.setdefault(choice.index, ToolStream(self.tool_use))
                text += self._tool_chunks(choice.index, stream.finish(), None)
                finish_reason = "tool_calls" if stream.calls else finish_reason
            text += self._chunk(DeltaMessage(), finish_reason, trace if choice.index == last else None, choice.index)
        if self.include_usage:
            usage = ChatCompletionChunk(**self.fields, choices=[], usage=usage_of(result))
            text += data_line(usage.model_dump_json())
        return text

    def _tool_chunks(self, index: int, pieces: list, logprobs: list | None) -> str:
        """An answer's content and tool-call deltas; the logprobs of text its tool stream holds back go out with
        the next chunk it sends."""
        pending = self.pending_logprobs.setdefault(index, [])
        pending += logprobs or []
        text = ""
        for content, call in pieces:
            sent, pending[:] = list(pending), []
            text += self._chunk(DeltaMessage(content=content, tool_calls=[call] if call else None), index=index,
                                logprobs=choice_logprobs(sent) if logprobs is not None or sent else None)
        return text

    def end(self) -> str:
        return data_line("[DONE]")

    def error(self, info: ErrorInfo) -> str:
        return data_line(info.json()) + data_line("[DONE]")


class NativeRenderer:
    """The /v1/relat stream: ttt_step, agent, token and done events (error on failure)."""

    def __init__(self, fields: dict):
        self.fields = fields  # id, created, model

    def start(self) -> str:
        return ""

    def event(self, event: StreamEvent) -> str:
        if isinstance(event, TrainStep):
            return typed_event("ttt_step", TrainStepEvent(**asdict(event)))
        if isinstance(event, AgentDone):
            return typed_event("agent", AgentTurn(**event.turn))
        if isinstance(event, TextDelta):
            return typed_event("token", TokenEvent(text=event.text, index=event.index,
                                                   logprobs=choice_logprobs(event.logprobs)))
        return typed_event("done", relat_response(event.result, self.fields))

    def end(self) -> str:
        return ""

    def error(self, info: ErrorInfo) -> str:
        return typed_event("error", StreamError(**info.body(), status=info.status))


async def sse_stream(job: Job, renderer: ChatRenderer | NativeRenderer,
                     on_error: Callable[[ErrorInfo], None]) -> AsyncIterator[str]:
    """The body of a streaming response; an error after the 200 went out becomes an error event."""
    try:
        yield renderer.start()
        async for event in job.events(heartbeat=HEARTBEAT_SECONDS):
            yield ": keep-alive\n\n" if event is HEARTBEAT else renderer.event(event)
        yield renderer.end()
    except Exception as error:  # CancelledError (the client left) is not an Exception: it passes through
        info = describe(error)
        on_error(info)
        yield renderer.error(info)
    finally:
        job.cancel()


async def run_to_end(job: Job, request: HTTPRequest) -> Result | None:
    """The job's result, or None if the client disconnected first (the job is then cancelled)."""

    async def result() -> Result:
        async for event in job.events():
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("events ended without a result")

    return await unless_disconnected(result(), request, [job])


def chat_response(result: Result, completion_id: str, created: int, model: str,
                  ignored_fields: list[str] | None = None, tool_use: ToolUse | None = None) -> ChatCompletionResponse:
    """The whole response; `ignored_fields` (the request's top-level fields this server does not serve) ride in
    the trace, so that a client sees what was not applied. With tools, each answer's calls are parsed out of it."""
    choices = []
    for choice in result.choices:
        content, calls = parse_reply(choice.text, tool_use)
        choices.append(ChatCompletionChoice(
            index=choice.index, message=AssistantMessage(content=content, tool_calls=calls),
            logprobs=choice_logprobs(choice.logprobs), finish_reason="tool_calls" if calls else choice.finish_reason))
    return ChatCompletionResponse(id=completion_id, created=created, model=model, choices=choices,
                                  usage=usage_of(result),
                                  relat={**result.trace.to_dict(), "ignored_fields": ignored_fields or []})


def relat_response(result: Result, fields: dict) -> RelatResponse:
    choices = [RelatChoice(index=choice.index, answer=choice.text, finish_reason=choice.finish_reason,
                           logprobs=choice_logprobs(choice.logprobs))
               for choice in result.choices] if len(result.choices) > 1 else None
    return RelatResponse(**fields, answer=result.text, finish_reason=result.finish_reason, choices=choices,
                         logprobs=choice_logprobs(result.choices[0].logprobs if result.choices else None),
                         usage=usage_of(result), trace=result.trace.to_dict())
