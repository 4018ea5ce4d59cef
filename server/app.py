"""The HTTP application: `create_app(settings)` builds it; routes translate HTTP to engine calls and back.

Life of the app: it listens at once and loads the model in a thread (`/health` 200, `/ready` 503 until it is
loaded); SIGTERM (through `Service.drain`, called by `relat serve`) turns `/ready` to 503 and refuses new work
while in-flight requests finish. Everything per app lives on `app.state.service`, so tests can run several apps.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relat_core import AgentPrompts, Engine, InvalidParameter, load_model

from .errors import (
    APIError,
    BadRequest,
    ErrorInfo,
    ModelNotFound,
    PayloadTooLarge,
    PromptTooLong,
    Unauthorized,
    Unavailable,
    describe,
)
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    ModelCard,
    ModelList,
    RelatRequest,
    ServerDefaults,
    engine_request,
    new_id,
    now,
)
from .runner import Job, Runner
from .settings import Settings
from .streaming import SSE_HEADERS, ChatRenderer, NativeRenderer, chat_response, relat_response, run_to_end, sse_stream

log = logging.getLogger("relat_server")

CLIENT_CLOSED = 499  # nginx's status for "the client went away first"; nobody receives it


def default_loader(settings: Settings) -> Callable[[], Engine]:
    def load() -> Engine:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        # Before the model: a prompts file that went bad since the settings checked it fails in a moment.
        prompts = AgentPrompts.load(settings.agent_prompts) if settings.agent_prompts else None
        loaded = load_model(settings.model, settings.device, settings.dtype, name=settings.served_model_name)
        return Engine(loaded, max_rank=settings.max_rank, num_slots=settings.max_concurrency, agent_prompts=prompts)

    return load


class Service:
    """The per-app state: settings, metrics, the engine's runner, and the phase (loading/ready/draining/failed)."""

    def __init__(self, settings: Settings, load_engine: Callable[[], Engine]):
        self.settings = settings
        self.metrics = Metrics()
        self.phase = "loading"
        self.created = now()
        self._load_engine = load_engine
        self._api_keys = [key.encode() for key in settings.api_keys]
        self.runner: Runner | None = None
        self.defaults: ServerDefaults | None = None
        self.model_name = settings.served_model_name or ""
        self.tokenizer: Any = None
        # `relat serve` sets this to stop the process when the model cannot be loaded.
        self.on_fatal: Callable[[], None] | None = None

    async def load(self) -> None:
        runner = Runner(self._load_engine, self.metrics, self.settings.max_queue, self.settings.max_concurrency,
                        self.settings.batch_window)
        try:
            engine = await runner.start()  # loaded on the thread that will run it
            defaults = engine.defaults.replace(**self.settings.ttt_fields())
        except Exception:
            log.exception("cannot load the model")
            await asyncio.to_thread(runner.stop)
            self.phase = "failed"
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.defaults = ServerDefaults(defaults, self.settings.sampling_defaults())
        # The engine's thread uses its tokenizer; a fast tokenizer must not be used by two threads at once.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.model_name = self.settings.served_model_name or engine.name
        self.runner = runner
        self.phase = "ready"
        log.info("serving %s; default TTT parameters: %s", self.model_name, defaults)

    async def drain(self) -> None:
        """Refuse new requests and wait for in-flight ones, up to the drain timeout; then cancel what is left,
        so that its clients get an error event (503) instead of a stream cut off by the shutdown."""
        if self.phase == "ready":
            self.phase = "draining"
        if self.runner is not None:
            log.info("draining: waiting up to %.0f s for in-flight requests", self.settings.drain_timeout)
            if not await self.runner.drain(self.settings.drain_timeout):
                log.warning("drain timeout: cancelling the requests still in flight")
                await self.stop()

    async def stop(self) -> None:
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)

    # -- request checks, in the order a request meets them -------------------------------------------------

    def authorize(self, header: str | None) -> None:
        if not self._api_keys:
            return
        scheme, _, token = (header or "").partition(" ")
        given = token.strip().encode()
        # compare_digest with every key, no early exit: the time taken says nothing about which key came close.
        matched = False
        for key in self._api_keys:
            matched |= secrets.compare_digest(given, key)
        if scheme.lower() != "bearer" or not matched:
            raise Unauthorized("missing or invalid API key; send Authorization: Bearer <key>")

    def check_ready(self) -> None:
        reasons = {"loading": "the model is still loading", "draining": "the server is shutting down",
                   "failed": "the model failed to load"}
        if self.phase != "ready":
            raise Unavailable(reasons[self.phase])

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ModelNotFound(f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                                param="model")

    def check_prompt(self, messages: list[dict[str, str]]) -> None:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        limit = self.settings.max_prompt_tokens
        if count > limit:
            raise PromptTooLong(f"the prompt has {count} tokens; this server accepts at most {limit}",
                                param="messages")

    def submit(self, request_id: str, messages: list[dict], ttt_fields: dict, sampling_fields: dict,
               timeout: float | None, ttt_prefix: str) -> Job:
        """Validate a request's parameters and prompt, then queue it (the deadline: at most the server's)."""
        assert self.runner is not None and self.defaults is not None
        request = engine_request(messages, ttt_fields, sampling_fields, self.defaults, ttt_prefix)
        try:
            messages = self.runner.engine.check(request)
        except InvalidParameter as error:
            if error.param.startswith("messages"):
                raise
            raise InvalidParameter(ttt_prefix + error.param, str(error)) from None
        self.check_prompt(messages)
        deadline = min(timeout or self.settings.request_timeout, self.settings.request_timeout)
        return self.runner.submit(request_id, request, deadline)

    def count_error(self, info: ErrorInfo) -> None:
        self.metrics.errors.labels(str(info.status)).inc()


def service_of(request: HTTPRequest) -> Service:
    return request.app.state.service


async def read_json(request: HTTPRequest, limit: int) -> dict:
    """The body as a JSON object: 413 past `limit` bytes (declared or streamed), 400 for anything not an object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


async def parse(request: HTTPRequest, model: type[BaseModel]) -> Any:
    service = service_of(request)
    service.check_ready()
    body = model.model_validate(await read_json(request, service.settings.max_body_bytes))
    service.check_model(body.model)
    return body


async def require_api_key(request: HTTPRequest) -> None:
    service_of(request).authorize(request.headers.get("authorization"))


def stream_response(service: Service, job: Job, renderer: ChatRenderer | NativeRenderer) -> StreamingResponse:
    return StreamingResponse(sse_stream(job, renderer, service.count_error), media_type="text/event-stream",
                             headers=SSE_HEADERS)


# -- routes -------------------------------------------------------------------------------------------------

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@api.post("/chat/completions")
async def chat_completions(request: HTTPRequest) -> Response:
    service = service_of(request)
    body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
    relat = body.relat
    job = service.submit(request.state.request_id, messages, relat.ttt_fields() if relat else {},
                         body.sampling_fields(), relat.timeout if relat else None, ttt_prefix="relat.")
    completion_id, created = new_id("chatcmpl"), now()
    if body.stream:
        renderer = ChatRenderer(completion_id, created, service.model_name, body.include_usage)
        return stream_response(service, job, renderer)
    result = await run_to_end(job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(chat_response(result, completion_id, created, service.model_name).model_dump())


@api.post("/relat")
async def relat(request: HTTPRequest) -> Response:
    service = service_of(request)
    body: RelatRequest = await parse(request, RelatRequest)
    job = service.submit(request.state.request_id, body.messages(), body.ttt_fields(), body.sampling_fields(),
                         body.timeout, ttt_prefix="")
    fields = {"id": new_id("relat"), "created": now(), "model": service.model_name}
    if body.stream:
        return stream_response(service, job, NativeRenderer(fields))
    result = await run_to_end(job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(relat_response(result, fields).model_dump())


@api.get("/models")
async def models(request: HTTPRequest) -> ModelList:
    service = service_of(request)
    service.check_ready()
    return ModelList(data=[ModelCard(id=service.model_name, created=service.created)])


probes = APIRouter()


@probes.get("/health")
async def health(request: HTTPRequest) -> Response:
    failed = service_of(request).phase == "failed"
    return JSONResponse({"status": "failed" if failed else "ok"}, status_code=503 if failed else 200)


@probes.get("/ready")
async def ready(request: HTTPRequest) -> Response:
    # Not an error response (and not counted as one): a probe's answer while loading or draining.
    phase = service_of(request).phase
    return JSONResponse({"status": phase}, status_code=200 if phase == "ready" else 503)


@probes.get("/metrics")
async def metrics(request: HTTPRequest) -> Response:
    return PlainTextResponse(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- errors and request ids -------------------------------------------------------------------------------

def error_response(service: Service, info: ErrorInfo) -> JSONResponse:
    service.count_error(info)
    return JSONResponse(info.body(), status_code=info.status, headers=info.headers)


_REQUEST_ID = re.compile(r"[\w.:/+=-]{1,128}")  # echo ids that are safe in a header and a log line


class RequestContext:
    """Pure ASGI middleware (it must not wrap `receive`): X-Request-Id on every response, and the 500 of last
    resort, so that even an unexpected error gets the OpenAI error shape, the id, and no stack trace."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            if started:  # the status line went out already; all we can do is end the connection
                raise
            await error_response(self.service, describe(error))(scope, receive, send_with_id)


def _handler(service: Service) -> Callable[[HTTPRequest, Exception], Awaitable[JSONResponse]]:
    async def handle(request: HTTPRequest, error: Exception) -> JSONResponse:
        return error_response(service, describe(error))

    return handle


def create_app(settings: Settings, load_engine: Callable[[], Engine] | None = None) -> FastAPI:
    """The app; `load_engine` (tests, embedders) replaces loading the model that the settings name."""
    service = Service(settings, load_engine or default_loader(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(service.load())
        try:
            yield
        finally:
            await service.stop()
            if not loading.done():  # the loading thread cannot be interrupted; do not wait for it
                loading.cancel()

    app = FastAPI(title="relat", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible inference with per-request test-time training (ReLAT)")
    app.state.service = service
    app.include_router(api)
    app.include_router(probes)
    handle = _handler(service)
    for error_class in (APIError, InvalidParameter, ValidationError, RequestValidationError, HTTPException):
        app.add_exception_handler(error_class, handle)
    app.add_middleware(RequestContext, service=service)
    return app
