"""The HTTP application: `create_app(settings)` builds it; routes translate HTTP to engine calls and back.

Life of the app: it listens at once and loads the model in a thread (`/health` 200, `/ready` 503 until it is
loaded); SIGTERM (through `Service.drain`, called by `relat serve`) turns `/ready` to 503 and refuses new work
while in-flight requests finish. Everything per app lives on `app.state.service`, so tests can run several apps.
Requests are validated by the server's own request classes (its limits in their bounds), which its OpenAPI
document is generated from (server/openapi.py).
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relat_core import (
    AdapterCache,
    AgentPrompts,
    Engine,
    InvalidParameter,
    Request,
    Result,
    TTTParams,
    load_model,
    weights_digest,
)
from relat_core.export import adapter_bytes

from .adapters import AdapterStore
from .errors import (
    AdapterNotFound,
    APIError,
    BadRequest,
    ContextLengthExceeded,
    ErrorInfo,
    Forbidden,
    ModelNotFound,
    PayloadTooLarge,
    PromptTooLong,
    Unauthorized,
    Unavailable,
    describe,
)
from .metrics import Metrics
from .openapi import openapi_document
from .protocol import (
    AdminStatus,
    ChatCompletionRequest,
    Health,
    ModelCard,
    ModelList,
    Readiness,
    RelatRequest,
    ServerDefaults,
    engine_request,
    new_id,
    now,
    request_models,
)
from .runner import Job, Runner
from .settings import Settings
from .streaming import SSE_HEADERS, ChatRenderer, NativeRenderer, chat_response, relat_response, run_to_end, sse_stream

log = logging.getLogger("relat_server")

CLIENT_CLOSED = 499  # nginx's status for "the client went away first"; nobody receives it
OPEN_PATHS = frozenset({"/health", "/ready"})  # probes: kubelets and load balancers send no key
# The playground's page and files hold no data (the page asks for the key), so they need none.
PLAYGROUND_PATHS = frozenset({"/"})
STATIC_PREFIX = "/static/"
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page loads nothing but its own files and talks to nothing but this server.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                           "base-uri 'none'; form-action 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def default_loader(settings: Settings) -> Callable[[], Engine]:
    def load() -> Engine:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        # Before the model: a prompts file that went bad since the settings checked it fails in a moment.
        prompts = AgentPrompts.load(settings.agent_prompts) if settings.agent_prompts else None
        loaded = load_model(settings.model, settings.device, settings.dtype, name=settings.served_model_name,
                            pack_weights=settings.pack_weights)
        cache = AdapterCache(settings.adapter_cache_entries, settings.adapter_cache_bytes)
        return Engine(loaded, max_rank=settings.max_rank, num_slots=settings.max_concurrency, agent_prompts=prompts,
                      adapter_cache=cache)

    return load


class Service:
    """The per-app state: settings, metrics, the engine's runner, and the phase (loading/ready/draining/failed)."""

    def __init__(self, settings: Settings, load_engine: Callable[[], Engine]):
        self.settings = settings
        self.metrics = Metrics()
        self.phase = "loading"
        self.created = now()
        self._load_engine = load_engine
        # Digests of equal length: comparing them takes the same time whatever the key sent, even its length.
        self._key_digests = [_digest(key.get_secret_value().encode()) for key in settings.api_keys]
        self.models = request_models(settings.limits(), settings.answers_limit)
        self.context_length: int | None = None  # prompt + answer, in tokens; known once the model is loaded
        self.runner: Runner | None = None
        self.defaults: ServerDefaults | None = None
        self.model_name = settings.served_model_name or ""
        self.family = ""  # the loaded model's architecture (Engine.family)
        self.tokenizer: Any = None
        self.base_digest: str | None = None  # the base weights' SHA-256 once loaded, for GET /admin/status
        self.adapters = AdapterStore(settings.max_adapters, settings.adapter_ttl, settings.max_adapter_bytes)
        # `relat serve` sets this to stop the process when the model cannot be loaded or the engine dies.
        self.on_fatal: Callable[[], None] | None = None

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        runner = Runner(self._load_engine, self.metrics, self.settings.max_queue, self.settings.max_concurrency,
                        self.settings.batch_window, on_death=lambda _: loop.call_soon_threadsafe(self._fail),
                        on_result=self.keep_adapter)
        try:
            engine = await runner.start()  # loaded on the thread that will run it
            defaults = self._defaults(engine)
            # Off the engine's thread and the event loop (hashlib releases the GIL): about 1 s per GB of weights.
            self.base_digest = await asyncio.to_thread(weights_digest, engine.model)
        except Exception:
            log.exception("cannot load the model")
            await asyncio.to_thread(runner.stop)
            self._fail()
            return
        self.defaults = ServerDefaults(defaults, self.settings.sampling_defaults())
        # The engine's thread uses its tokenizer; a fast tokenizer must not be used by two threads at once.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.model_name = self.settings.served_model_name or engine.name
        self.family = engine.family
        self.context_length = self._context_length(engine)
        self.runner = runner
        self.phase = "ready"
        log.info("serving %s; default TTT parameters: %s", self.model_name, defaults)

    def _fail(self) -> None:
        """The model could not be loaded or the engine's thread died: /health turns 503 and the process stops."""
        self.phase = "failed"
        if self.on_fatal is not None:
            self.on_fatal()

    def _defaults(self, engine: Engine) -> TTTParams:
        """The engine's defaults for the model with the operator's settings applied, within the server's limits:
        a request that leaves a field out must not be given more than it may ask for."""
        defaults = engine.defaults.replace(**self.settings.ttt_fields())
        # Options the model cannot take (a Huginn option on another model, targets it lacks) stop the start-up
        # here, naming the setting, rather than failing every request.
        engine.check(Request([{"role": "user", "content": "?"}], defaults))
        over = {name: limit for name, limit in self.settings.limits().items()
                if getattr(defaults, name) is not None and getattr(defaults, name) > limit}
        if over:
            log.warning("the model's defaults (%s) exceed this server's limits; using the limits",
                        ", ".join(f"{name} {getattr(defaults, name)}" for name in over))
            defaults = defaults.replace(**over)
        return defaults

    def _context_length(self, engine: Engine) -> int | None:
        """The model's context (max_position_embeddings), or the max_model_len setting below it."""
        model = getattr(engine.model.config, "max_position_embeddings", None)
        setting = self.settings.max_model_len
        if setting is not None and model is not None and setting > model:
            log.warning("max_model_len %d is over the model's context of %d tokens; using %d", setting, model, model)
        return min((n for n in (model, setting) if n is not None), default=None)

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

    @property
    def has_keys(self) -> bool:
        return bool(self._key_digests)

    def requires_key(self, path: str) -> bool:
        """Every route needs a key when keys are set, but the probes, the playground's page and static files (no
        data in them), and /metrics unless metrics_need_key."""
        if not self.has_keys or path in OPEN_PATHS or path in PLAYGROUND_PATHS or path.startswith(STATIC_PREFIX):
            return False
        return path != "/metrics" or self.settings.metrics_need_key

    def authorize(self, header: bytes) -> None:
        """Raises Unauthorized unless `header` is `Bearer <one of the keys>`; the key is never logged or echoed."""
        scheme, _, token = header.partition(b" ")
        given = _digest(token.strip())
        # compare_digest with every key, no early exit: the time taken says nothing about which key came close.
        matched = False
        for digest in self._key_digests:
            matched |= hmac.compare_digest(given, digest)
        if scheme.lower() != b"bearer" or not matched:
            raise Unauthorized("missing or invalid API key; send Authorization: Bearer <key>")

    def check_ready(self) -> None:
        reasons = {"loading": "the model is still loading", "draining": "the server is shutting down",
                   "failed": "the engine failed"}
        if self.phase != "ready":
            raise Unavailable(reasons[self.phase])

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ModelNotFound(f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                                param="model")

    def check_prompt(self, messages: list[dict[str, str]]) -> int:
        """The prompt's length in tokens; 413 past max_prompt_tokens or with no room left for an answer."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        limit = self.settings.max_prompt_tokens
        if count > limit:
            raise PromptTooLong(f"the prompt has {count} tokens; this server accepts at most {limit}",
                                param="messages")
        if self.context_length is not None and count >= self.context_length:
            raise PromptTooLong(f"the prompt has {count} tokens; the model's context is {self.context_length}",
                                param="messages")
        return count

    def fit_context(self, request: Request, prompt_tokens: int, sent: bool, param: str) -> Request:
        """The answer within the context the prompt leaves, as vLLM has it: a request that asks for more is a 400;
        the server's default length is cut to fit."""
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if room is None or request.sampling.max_tokens <= room:
            return request
        if sent:
            raise ContextLengthExceeded(
                f"the model's context is {self.context_length} tokens: the prompt's {prompt_tokens} leave {room} "
                f"for the answer, and {param} asks for {request.sampling.max_tokens}", param=param)
        return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=room))

    def submit(self, request_id: str, messages: list[dict], ttt_fields: dict, sampling_fields: dict,
               timeout: float | None, ttt_prefix: str, max_tokens_param: str, return_adapter: bool = False) -> Job:
        """Validate a request's parameters, prompt and length, then queue it (the deadline: at most the server's)."""
        assert self.runner is not None and self.defaults is not None
        request = engine_request(messages, ttt_fields, sampling_fields, self.defaults, ttt_prefix, return_adapter)
        if return_adapter and not self.adapters.enabled:
            raise BadRequest("this server keeps no adapters (max_adapters is 0)", param=ttt_prefix + "return_adapter")
        try:
            messages = self.runner.engine.check(request)
        except InvalidParameter as error:
            if error.param.startswith("messages"):
                raise
            raise InvalidParameter(ttt_prefix + error.param, str(error)) from None
        if return_adapter:
            size = adapter_bytes(self.runner.engine.bank, request.ttt.rank, request.ttt.targets)
            if size > self.adapters.max_bytes:
                raise BadRequest(f"this adapter would take {size} bytes; this server keeps at most "
                                 f"{self.adapters.max_bytes} (max_adapter_bytes)", param=ttt_prefix + "return_adapter")
        prompt_tokens = self.check_prompt(messages)
        request = self.fit_context(request, prompt_tokens, sampling_fields["max_tokens"] is not None,
                                   max_tokens_param)
        deadline = min(timeout or self.settings.request_timeout, self.settings.request_timeout)
        return self.runner.submit(request_id, request, deadline)

    def keep_adapter(self, result: Result) -> None:
        """On the engine's thread, as a request finishes: keep its exported adapter, and say in the trace where."""
        if result.adapter is not None:
            kept = self.adapters.put(result.adapter)
            result.adapter = None  # the store holds it now
            result.trace.adapter = {**(result.trace.adapter or {}), **kept.reference()}

    def count_error(self, info: ErrorInfo) -> None:
        self.metrics.errors.labels(str(info.status)).inc()


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


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
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
    relat = body.relat
    job = service.submit(request.state.request_id, messages, relat.ttt_fields() if relat else {},
                         body.sampling_fields(), relat.timeout if relat else None, ttt_prefix="relat.",
                         max_tokens_param=body.max_tokens_param, return_adapter=bool(relat and relat.return_adapter))
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
    """One question in, the answer and the whole trace out; typed events when streaming."""
    service = service_of(request)
    body: RelatRequest = await parse(request, service.models.native)
    job = service.submit(request.state.request_id, body.messages(), body.ttt_fields(), body.sampling_fields(),
                         body.timeout, ttt_prefix="", max_tokens_param=body.max_tokens_param,
                         return_adapter=bool(body.return_adapter))
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
    adapter_model.safetensors); 404 once it has expired or newer ones have pushed it out."""
    kept = service_of(request).adapters.get(adapter_id)
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
                       base_weights_unchanged=digest == service.base_digest, adapter_slots=engine.bank.num_slots,
                       adapter_slots_in_use=engine.slots_in_use, requests_running=running, requests_waiting=waiting,
                       resident_memory_bytes=memory)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; musl and other systems have none
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def resident_memory_bytes() -> int | None:
    """This process's resident set from /proc/self/statm (pages), or None off Linux. The C allocator first returns
    its free pages to the system (glibc's malloc_trim): it keeps tens of MB per thread after a batch's tensors
    are freed, and without this the figure says more about when the last batch ended than about memory in use."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# -- errors and request ids -------------------------------------------------------------------------------

def error_response(service: Service, info: ErrorInfo) -> JSONResponse:
    service.count_error(info)
    return JSONResponse(info.body(), status_code=info.status, headers=info.headers)


# A client's X-Request-Id goes into log lines and a response header: only ASCII letters, digits and a few marks,
# so that it can neither break a line nor smuggle anything; any other is replaced by one of ours.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _route_path(scope: Scope) -> str:
    """The path as routes see it (without the root path of an app mounted below a prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class RequestContext:
    """Pure ASGI middleware (it must not wrap `receive`): X-Request-Id on every response, the API key check before
    any route (unknown paths and the OpenAPI document included), and the 500 of last resort, so that even an
    unexpected error gets the OpenAI error shape, the id, and no stack trace."""

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

        if self.service.requires_key(_route_path(scope)):
            try:
                self.service.authorize(dict(scope["headers"]).get(b"authorization", b""))
            except Unauthorized as error:
                await error_response(self.service, describe(error))(scope, receive, send_with_id)
                return
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
    app.include_router(admin)
    app.include_router(playground)
    app.mount(STATIC_PREFIX.rstrip("/"), PlaygroundFiles(directory=STATIC_DIR), name="static")
    app.openapi = lambda: openapi_document(app, service)  # type: ignore[method-assign]
    handle = _handler(service)
    for error_class in (APIError, InvalidParameter, ValidationError, RequestValidationError, HTTPException):
        app.add_exception_handler(error_class, handle)
    app.add_middleware(RequestContext, service=service)
    return app
