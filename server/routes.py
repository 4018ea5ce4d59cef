"""The HTTP routes: each translates HTTP to a call on the app's `Service` (server/service.py) and back.

Requests are validated by the server's own request classes (its limits in their bounds), which the OpenAPI
document is generated from (server/openapi.py). API keys are checked before any route (server/app.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.requests import Request as HTTPRequest
from starlette.types import Scope

from relat_core import weights_digest
from relat_core.memory import resident_memory_bytes

from . import completions as completion
from .errors import AdapterNotFound, Forbidden, PayloadTooLarge
from .protocol import (
    AdminStatus,
    ChatCompletionRequest,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    RelatRequest,
    new_id,
    now,
)
from .runner import Job
from .service import Service
from .streaming import SSE_HEADERS, ChatRenderer, NativeRenderer, chat_response, relat_response, run_to_end, sse_stream
from .tools import answer_shape

CLIENT_CLOSED = 499  # nginx's status for "the client went away first"; nobody receives it
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page loads nothing but its own files and talks to nothing but this server.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                           "base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def service_of(request: HTTPRequest) -> Service:
    return request.app.state.service


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
    return bytes(body)


async def parse(request: HTTPRequest, model: type[BaseModel]) -> Any:
    """The body as `model` (one of the server's request classes): pydantic parses the JSON itself, so that invalid
    JSON, a body that is not an object and a field of the wrong type are all 400s that say so."""
    service = service_of(request)
    service.check_ready()
    body = model.model_validate_json(await read_body(request, service.settings.max_body_bytes))
    service.check_model(body.model)
    return body


def stream_response(service: Service, job: Job, renderer: ChatRenderer | NativeRenderer) -> StreamingResponse:
    return StreamingResponse(sse_stream(job, renderer, service.count_error), media_type="text/event-stream",
                             headers=SSE_HEADERS)


# -- routes -------------------------------------------------------------------------------------------------

api = APIRouter(prefix="/v1")  # keys are checked before routing (RequestContext), for every route that needs one


@api.post("/chat/completions")
async def chat_completions(request: HTTPRequest) -> Response:
    """OpenAI's Chat Completions, streaming or not, with the `relat` extension."""
    service = service_of(request)
    body: ChatCompletionRequest = await parse(request, service.models.chat)
    messages = [m.model_dump(include={"role", "content", "tool_calls", "tool_call_id"}, exclude_none=True)
                for m in body.messages]
    shape = answer_shape(body.response_format, body.tools, body.tool_choice, service.tool_template,
                         body.parallel_tool_calls)
    relat = body.relat
    job = service.submit(request.state.request_id, messages, relat.ttt_fields() if relat else {},
                         {**body.sampling_fields(), "structured_output": shape.structured_output},
                         relat.timeout if relat else None, ttt_prefix="relat.", max_tokens_param=body.max_tokens_param,
                         return_adapter=bool(relat and relat.return_adapter), tools=shape.tools,
                         tenant=request.state.tenant, cache_salt=relat.cache_salt if relat else None,
                         record=request.state.access)
    completion_id, created = new_id("chatcmpl"), now()
    ignored = sorted(body.model_extra or {})  # OpenAI's fields this server does not serve: logged, and listed
    if body.stream:
        renderer = ChatRenderer(completion_id, created, service.model_name, body.include_usage, ignored,
                                shape.tool_use)
        return stream_response(service, job, renderer)
    result = await run_to_end(job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(chat_response(result, completion_id, created, service.model_name, ignored,
                                      shape.tool_use).model_dump())


@api.post("/completions")
async def completions(request: HTTPRequest) -> Response:
    """OpenAI's legacy Completions: a raw prompt (or a list), echo and logprobs, with the `relat` extension."""
    service = service_of(request)
    return await completion.respond(service, request, await parse(request, service.models.completions))


@api.post("/relat")
async def relat(request: HTTPRequest) -> Response:
    """One question in, the answer and the whole trace out; typed events when streaming."""
    service = service_of(request)
    body: RelatRequest = await parse(request, service.models.native)
    shape = answer_shape(body.response_format, None, None, service.tool_template)
    job = service.submit(request.state.request_id, body.messages(), body.ttt_fields(),
                         {**body.sampling_fields(), "structured_output": shape.structured_output},
                         body.timeout, ttt_prefix="", max_tokens_param=body.max_tokens_param,
                         return_adapter=bool(body.return_adapter), tenant=request.state.tenant,
                         cache_salt=body.cache_salt, record=request.state.access)
    fields = {"id": new_id("relat"), "created": now(), "model": service.model_name}
    if body.stream:
        return stream_response(service, job, NativeRenderer(fields))
    result = await run_to_end(job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(relat_response(result, fields).model_dump())


@api.get("/adapters/{adapter_id}")
async def adapter(request: HTTPRequest, adapter_id: str) -> Response:
    """An adapter a request kept (`return_adapter`), as a zip of PEFT's files (adapter_config.json and
    adapter_model.safetensors); 404 once it has expired or newer ones have pushed it out, and to another tenant
    (the same 404: an id's existence is not confirmed)."""
    kept = service_of(request).adapters.get(adapter_id, request.state.tenant.name)
    if kept is None:
        raise AdapterNotFound(f"no adapter {adapter_id!r}: it expired, was evicted, or never was", param="adapter_id")
    body = await asyncio.to_thread(kept.archive)  # serialising megabytes: off the event loop
    return Response(body, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{kept.id}.zip"'})


@api.get("/models")
async def models(request: HTTPRequest) -> ModelList:
    """The served model (one)."""
    service = service_of(request)
    service.check_ready()
    return ModelList(data=[ModelCard(id=service.model_name, created=service.created, family=service.family,
                                     max_model_len=service.context_length, num_steps=service.defaults.ttt.num_steps,
                                     max_num_steps=service.settings.max_num_steps if service.defaults.ttt.num_steps
                                     else None)])


probes = APIRouter()


@probes.get("/health")
async def health(request: HTTPRequest) -> Response:
    """200 while the process is alive; 503 if the model failed to load or the engine's thread died."""
    failed = service_of(request).phase == "failed"
    return JSONResponse(Health(status="failed" if failed else "ok").model_dump(), status_code=503 if failed else 200)


@probes.get("/ready")
async def ready(request: HTTPRequest) -> Response:
    """200 when requests are accepted; 503 while the model loads or the server drains."""
    # Not an error response (and not counted as one): a probe's answer while loading or draining.
    phase = service_of(request).phase
    return JSONResponse(Readiness(status=phase).model_dump(), status_code=200 if phase == "ready" else 503)


@probes.get("/metrics")
async def metrics(request: HTTPRequest) -> Response:
    """Prometheus metrics."""
    return PlainTextResponse(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


playground = APIRouter(include_in_schema=False)  # a page, not API: out of the OpenAPI document


@playground.get("/")
async def playground_page() -> Response:
    """The playground (server/static): asks /v1/relat and shows the answer, the loss per step and the phases."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


class PlaygroundFiles(StaticFiles):
    """The playground's scripts and styles, with the page's security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


admin = APIRouter(prefix="/admin")


@admin.get("/status")
async def admin_status(request: HTTPRequest) -> AdminStatus:
    """The base weights' checksum now and at start-up, adapter slots and requests in use, resident memory. Only
    with a key: on a server without keys it is refused (403), since anyone could make it hash the weights."""
    service = service_of(request)
    if not service.has_keys:
        raise Forbidden("the admin routes need API keys; start the server with --api-keys (RELAT_API_KEYS)")
    if service.phase not in ("ready", "draining"):
        service.check_ready()  # loading or failed: 503
    assert service.runner is not None and service.runner.engine is not None and service.base_digest is not None
    engine = service.runner.engine
    digest, memory = await asyncio.to_thread(lambda: (weights_digest(engine.model), resident_memory_bytes()))
    running, waiting = service.runner.counts()
    return AdminStatus(phase=service.phase, base_weights_sha256=digest,
                       base_weights_sha256_at_start=service.base_digest,
                       base_weights_unchanged=digest == service.base_digest, weights=engine.weights_format,
                       adapter_slots=engine.bank.num_slots,
                       adapter_slots_in_use=engine.slots_in_use, requests_running=running, requests_waiting=waiting,
                       resident_memory_bytes=memory)
