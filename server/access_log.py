"""The audit trail: a JSON-lines access log (`--access-log PATH`, RELAT_ACCESS_LOG; `-` for stderr), one line per
HTTP request.

Each line: time (arrival, UTC, ISO 8601), request_id, tenant (its name; null when no key matched), method, route,
status, seconds (arrival to the end of the response, a stream's included), prompt_tokens, completion_tokens and
cache ("hit", "miss", or "none" where the adapter cache was not consulted). Never the key; never the prompt or the
answer unless `--log-prompts`, which adds `prompts` and `answers`. Probes, /metrics and the playground's files
are not logged: they carry no tenant's work, and a load balancer's probe every second would drown the rest.

The middleware (server/app.py) opens a `RequestRecord` per request; the service adds each finished engine request
to it (Service.on_result, on the engine's thread, before the route can answer); the middleware writes the line
once the response has gone out.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Any

from relat_core import Result

from .tenants import Tenant

UNLOGGED_PATHS = frozenset({"/health", "/ready", "/metrics", "/", "/favicon.ico"})
UNLOGGED_PREFIXES = ("/static/",)


def logged(path: str) -> bool:
    return path not in UNLOGGED_PATHS and not path.startswith(UNLOGGED_PREFIXES)


@dataclass
class RequestRecord:
    """What one HTTP request did, as the access log writes it: its tenant, then the engine requests it made."""

    tenant: Tenant | None  # None until a key matched (a 401 has none)
    started: float  # time.monotonic()
    time: str  # arrival, UTC ISO 8601
    prompt_tokens: int = 0
    completion_tokens: int = 0
    caches: list[str] = field(default_factory=list)  # each engine request's trace.cache: "hit" or "miss"
    prompts: list[Any] = field(default_factory=list)  # only with --log-prompts: messages or a raw prompt
    answers: list[str] = field(default_factory=list)  # only with --log-prompts

    @staticmethod
    def now() -> str:
        return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")

    def add(self, result: Result, log_prompts: bool) -> None:
        self.prompt_tokens += result.usage.prompt_tokens
        self.completion_tokens += result.usage.completion_tokens
        if result.trace.cache is not None:
            self.caches.append(result.trace.cache)
        if log_prompts:
            self.answers.extend(choice.text for choice in result.choices or [])

    @property
    def cache(self) -> str:
        """hit when every engine request that consulted the cache hit, miss when one missed, none when none did."""
        if not self.caches:
            return "none"
        return "miss" if "miss" in self.caches else "hit"


class AccessLog:
    """Writes the lines; None as the target writes nothing. Lines are whole: one write under a lock."""

    def __init__(self, target: str | None, log_prompts: bool = False):
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        self._stream: IO[str] | None = None
        if target == "-":
            self._stream = sys.stderr
        elif target:
            self._stream = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives with the app)

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, record: RequestRecord, request_id: str, method: str, route: str, status: int,
              seconds: float) -> None:
        if self._stream is None:
            return
        line: dict[str, Any] = {
            "time": record.time, "request_id": request_id,
            "tenant": record.tenant.name if record.tenant is not None else None,
            "method": method, "route": route, "status": status, "seconds": round(seconds, 4),
            "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
            "cache": record.cache}
        if self.log_prompts:
            line["prompts"] = record.prompts
            line["answers"] = record.answers
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self._stream.write(text)
            self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stderr:
            self._stream.close()
        self._stream = None
