"""Sync and async clients of the native endpoint (POST /v1/relat); one SSE parser and payload builder for both."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# Test-time training takes seconds to minutes before the first token; the server enforces its own deadline.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


@dataclass
class TrainStep:
    """One test-time training step of the request's adapter."""

    step: int
    steps: int
    loss: float
    grad_norm: float | None
    seconds: float


@dataclass
class AgentTurn:
    """An agent of a multi-agent request has finished, before the answering agent starts: `kind` is "latent"
    (LatentMAS: it added `latent_positions` to the shared memory) or "text" (TextMAS: it wrote `text`)."""

    role: str
    label: str
    kind: str
    prompt_tokens: int
    latent_positions: int
    completion_tokens: int
    seconds: float
    text: str | None = None


@dataclass
class Token:
    """Answer text that became safe to show (one or a few tokens)."""

    text: str


@dataclass
class Done:
    """The end: `result` is the server's response (answer, finish_reason, usage, trace)."""

    result: dict[str, Any]


Event = TrainStep | AgentTurn | Token | Done


class RelatError(Exception):
    """An error answer of the server, with OpenAI's fields."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None, request_id: str | None = None, retry_after: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after

    @classmethod
    def from_body(cls, status: int, body: Any, headers: httpx.Headers | None = None) -> RelatError:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            error = {"message": str(body)}
        headers = headers or httpx.Headers()
        return cls(status, error.get("message") or "", error.get("type"), error.get("code"), error.get("param"),
                   headers.get("x-request-id"), headers.get("retry-after"))


def _payload(question: str, stream: bool, options: dict[str, Any]) -> dict[str, Any]:
    """The request body: the question, then sampling and TTT options (None means the server's default)."""
    return {"question": question, "stream": stream, **{k: v for k, v in options.items() if v is not None}}


def _raise_for_status(response: httpx.Response, body: bytes) -> None:
    if response.status_code < 400:
        return
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = body.decode(errors="replace")
    raise RelatError.from_body(response.status_code, parsed, response.headers)


class SSEParser:
    """Server-Sent Events, line by line: returns (event, data) at each blank line; comments are skipped."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            if not self.data:
                return None
            message = (self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return message
        if line.startswith(":"):  # progress comments and keep-alives
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def _event(name: str, data: str) -> Event | None:
    payload = json.loads(data)
    if name == "ttt_step":
        return TrainStep(**{k: payload[k] for k in ("step", "steps", "loss", "grad_norm", "seconds")})
    if name == "agent":
        fields = ("role", "label", "kind", "prompt_tokens", "latent_positions", "completion_tokens", "seconds")
        return AgentTurn(**{k: payload[k] for k in fields}, text=payload.get("text"))
    if name == "token":
        return Token(payload["text"])
    if name == "done":
        return Done(payload)
    if name == "error":  # after the 200 went out; `status` is the one an error response would have had
        raise RelatError.from_body(payload.get("status", 500), payload)
    return None  # an event type this client does not know yet


class RelatClient:
    """Blocking client. Options are TTT fields (method, steps, latent_steps, lr, rank, agents, answer_format, ...)
    and sampling fields (max_tokens, temperature, top_p, top_k, seed, stop), plus `system` and `timeout` (seconds,
    server-side)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, http: httpx.Client | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> RelatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def ask(self, question: str, **options: Any) -> dict[str, Any]:
        """The whole result: answer, finish_reason, usage and trace."""
        response = self.http.post("/v1/relat", json=_payload(question, False, options))
        _raise_for_status(response, response.content)
        return response.json()

    def stream(self, question: str, **options: Any) -> Iterator[Event]:
        """TrainStep events while the adapter trains, AgentTurn events as agents finish (multi-agent requests),
        Token events as the answer comes, then Done."""
        with self.http.stream("POST", "/v1/relat", json=_payload(question, True, options)) as response:
            _raise_for_status(response, response.read() if response.status_code >= 400 else b"")
            parser = SSEParser()
            for line in response.iter_lines():
                message = parser.feed(line)
                if message is not None and (event := _event(*message)) is not None:
                    yield event

    def models(self) -> list[str]:
        response = self.http.get("/v1/models")
        _raise_for_status(response, response.content)
        return [model["id"] for model in response.json()["data"]]

    def ready(self) -> bool:
        return self.http.get("/ready").status_code == 200


class AsyncRelatClient:
    """The same as RelatClient, for asyncio."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, http: httpx.AsyncClient | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = http or httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    async def __aenter__(self) -> AsyncRelatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def ask(self, question: str, **options: Any) -> dict[str, Any]:
        response = await self.http.post("/v1/relat", json=_payload(question, False, options))
        _raise_for_status(response, response.content)
        return response.json()

    async def stream(self, question: str, **options: Any) -> AsyncIterator[Event]:
        async with self.http.stream("POST", "/v1/relat", json=_payload(question, True, options)) as response:
            _raise_for_status(response, await response.aread() if response.status_code >= 400 else b"")
            parser = SSEParser()
            async for line in response.aiter_lines():
                message = parser.feed(line)
                if message is not None and (event := _event(*message)) is not None:
                    yield event

    async def models(self) -> list[str]:
        response = await self.http.get("/v1/models")
        _raise_for_status(response, response.content)
        return [model["id"] for model in response.json()["data"]]

    async def ready(self) -> bool:
        return (await self.http.get("/ready")).status_code == 200
