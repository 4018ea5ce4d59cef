"""Waiting for a request's work while watching its client: a client that disconnects stops its jobs at once.

The non-streaming responses use it (server/streaming.py's `run_to_end` for chat and /v1/relat, server/completions.py's
`run_all` for a request's prompts); a stream needs no watcher, as its body's generator is cancelled when the client
leaves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from starlette.requests import Request as HTTPRequest

from .runner import Job

T = TypeVar("T")


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client goes away (the body was read already, so only http.disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Coroutine[Any, Any, T], request: HTTPRequest, jobs: Iterable[Job]) -> T | None:
    """What `work` returns (or raises), or None if the client disconnected first. Either way, on the way out `work`
    and the watcher are cancelled and so is every one of `jobs`: whatever of theirs is still running stops."""
    finished = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        return finished.result() if finished.done() else None
    finally:
        finished.cancel()
        gone.cancel()
        for job in jobs:
            job.cancel()
