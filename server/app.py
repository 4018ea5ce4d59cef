"""The HTTP application: `create_app(settings)` builds it from the routes (server/routes.py) and the per-app
`Service` (server/service.py), which loads the model and lives on `app.state.service`.

Here too: which paths need an API key, and the middleware (`RequestContext`) that checks the key before any
route and gives every response an X-Request-Id and every error OpenAI's shape. server/openapi.py builds the OpenAPI
document.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relat_core import Engine, InvalidParameter

from .access_log import RequestRecord, logged
from .errors import APIError, ErrorInfo, Unauthorized, Unavailable, describe
from .openapi import openapi_document
from .routes import STATIC_DIR, PlaygroundFiles, admin, api, playground, probes
from .served_schema import ServedModel
from .service import Service, default_loader
from .settings import Settings
from .tenants import ANONYMOUS

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes: kubelets and load balancers send no key
# The playground's page and files hold no data (the page asks for the key), so they need none.
PLAYGROUND_PATHS = frozenset({"/"})
STATIC_PREFIX = "/static/"
DOCUMENT_PATH = "/openapi.json"
WORK_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/relat"})  # counted per tenant


def requires_key(service: Service, path: str) -> bool:
    """Every route needs a key when keys are set, but the probes, the playground's page and static files (no
    data in them), and /metrics unless metrics_need_key."""
    if not service.has_keys or path in OPEN_PATHS or path in PLAYGROUND_PATHS or path.startswith(STATIC_PREFIX):
        return False
    return path != "/metrics" or service.settings.metrics_need_key


def served_model(service: Service) -> ServedModel | None:
    """What the OpenAPI document says of the loaded model (server/served_schema.py); None until it is loaded."""
    engine = service.runner.engine if service.runner is not None else None
    if engine is None:
        return None
    defaults = service.defaults.ttt if service.defaults is not None else None
    return ServedModel(recurrent=engine.recurrent, tools=service.tool_template.supported,
                       vocabulary=engine.vocabulary, context_length=service.context_length,
                       defaults={name: getattr(defaults, name) for name in ("method", "steps", "latent_steps", "gate")}
                       if defaults is not None else {}, targets=tuple(sorted(engine.bank.kinds)))


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


def _outcome(status: int) -> str:
    """A work request's outcome for the per-tenant metric, from its HTTP status."""
    if status < 400:
        return "success"
    return "rejected" if status == 429 else "error"


class RequestContext:
    """Pure ASGI middleware (it must not wrap `receive`): X-Request-Id on every response, the API key check before
    any route (unknown paths and the OpenAPI document included), which names the request's tenant
    (`request.state.tenant`; `anonymous` on a keyless server), and the 500 of last resort, so that even an
    unexpected error gets the OpenAI error shape, the id, and no stack trace. Once the response has gone out: the
    access log's line (server/access_log.py) and the per-tenant request count."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        path = _route_path(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # Until a key names one, a keyed server's request has no tenant (only the open paths go on without one).
        state["tenant"] = None if self.service.has_keys else ANONYMOUS
        record = None
        if self.service.access_log.enabled and logged(path):
            record = RequestRecord(None, time.monotonic(), RequestRecord.now())
        state["access"] = record
        status = 500  # what the log says if no response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self._respond(scope, receive, send_with_id, path)
        finally:
            tenant = state["tenant"]
            if tenant is not None and path in WORK_PATHS:
                self.service.metrics.tenant_requests.labels(tenant.name, _outcome(status)).inc()
            if record is not None:
                record.tenant = tenant
                self.service.access_log.write(record, request_id, scope.get("method", ""), path, status,
                                              time.monotonic() - record.started)

    async def _respond(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        started = False

        async def send_marked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        if requires_key(self.service, path):
            try:
                scope["state"]["tenant"] = self.service.authorize(dict(scope["headers"]).get(b"authorization", b""))
            except Unauthorized as error:
                await error_response(self.service, describe(error))(scope, receive, send_marked)
                return
        if path == DOCUMENT_PATH and served_model(self.service) is None:
            # The document describes the loaded model: until it is loaded there is none to serve (a client that
            # kept the document of every model would send options this one refuses). Loading or failed: a 503.
            try:
                self.service.check_ready()
            except Unavailable as error:
                await error_response(self.service, describe(error))(scope, receive, send_marked)
                return
        try:
            await self.app(scope, receive, send_marked)
        except Exception as error:
            if started:  # the status line went out already; all we can do is end the connection
                raise
            await error_response(self.service, describe(error))(scope, receive, send_marked)


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
    keys_needed = partial(requires_key, service)
    app.openapi = lambda: openapi_document(  # type: ignore[method-assign]
        app, service.models, keys_needed, served_model(service))
    handle = _handler(service)
    for error_class in (APIError, InvalidParameter, ValidationError, RequestValidationError, HTTPException):
        app.add_exception_handler(error_class, handle)
    app.add_middleware(RequestContext, service=service)
    return app
