"""The OpenAPI document (`GET /openapi.json`): this server's API as it really is.

The routes read their bodies themselves (to answer 413 while reading, and every error in OpenAI's shape), so
FastAPI sees no request model; this module adds what it cannot know. Request bodies are the JSON schemas of the
very classes the server validates with (its `RequestModels`, its limits in their bounds), responses those of the
classes it builds them from, streams one schema per Server-Sent Event (`itemSchema`, as FastAPI writes its own
event streams), and each operation lists every status it sends, errors in OpenAI's shape (`ErrorResponse`).
The document describes the model being served (server/served_schema.py): what it cannot take is left out.
What a schema cannot say is in the descriptions: the last message must be the user's question, `relat` needs a
latent step, and the prompt and the answer must fit in the model's context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .completions_protocol import CompletionChunk, CompletionResponse
from .errors import ErrorResponse, StreamError
from .protocol import (
    AdminStatus,
    AgentTurn,
    ChatCompletionChunk,
    ChatCompletionResponse,
    Health,
    ModelList,
    Readiness,
    RelatResponse,
    RequestModels,
    TokenEvent,
    TrainStepEvent,
)
from .served_schema import ServedModel, narrow, referenced

if TYPE_CHECKING:
    from fastapi import FastAPI

REF_TEMPLATE = "#/components/schemas/{model}"
SSE = "text/event-stream"

# Why each error status is sent; an operation lists those it can send.
ERRORS: dict[int, str] = {
    400: "Invalid JSON, a field of the wrong type or out of range (`param` names it as sent), or what the schema "
         "cannot say: the last message must be a non-empty user message, `relat` needs `latent_steps` >= 1, "
         "`return_adapter` needs method `relat` with `steps` >= 1 (and a server that keeps adapters), and the "
         "prompt and the answer asked for must fit in the model's context (code `context_length_exceeded`).",
    401: "API keys are set and the `Authorization: Bearer` key is missing or wrong.",
    403: "The server has no API keys set: the admin routes need one.",
    404: "`model` is not the served model; or the adapter is unknown, expired or evicted (`adapter_not_found`).",
    413: "The body is over `max_body_bytes`, or the prompt over `max_prompt_tokens` or the model's context.",
    429: "The queue is full; `Retry-After` says in how many seconds to retry.",
    500: "An internal error; the body says nothing more (the server log has it).",
    503: "The model is loading or failed to load, the server is shutting down, or it stopped the request.",
    504: "The request's deadline passed (`request_timeout`, or a shorter `relat.timeout`).",
}
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 503, 504)

REQUEST_ID = {"description": "the client's own X-Request-Id if it was plausible, else one made up; the log names the "
                             "request by it", "required": True,
              "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:/+=-]{1,128}$"}}
RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}


@dataclass(frozen=True)
class Operation:
    """What the document says of one route beyond FastAPI's own: its body, its answers and its errors."""

    request: str | None = None  # the attribute of RequestModels that validates its body
    json: type[BaseModel] | None = None  # its 200 (and, for probes, 503) body
    stream: str | None = None  # "chat", "native" or "completions": its 200 may also be an event stream
    errors: tuple[int, ...] = ()
    text: bool = False  # its 200 is text/plain (Prometheus)
    archive: bool = False  # its 200 is application/zip (an exported adapter)
    probe: bool = False  # 503 is not an error but the same body as 200


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("post", "/v1/chat/completions"): Operation("chat", ChatCompletionResponse, "chat", GENERATION_ERRORS),
    ("post", "/v1/relat"): Operation("native", RelatResponse, "native", GENERATION_ERRORS),
    ("post", "/v1/completions"): Operation("completions", CompletionResponse, "completions", GENERATION_ERRORS),
    ("get", "/v1/models"): Operation(json=ModelList, errors=(401, 500, 503)),
    ("get", "/v1/adapters/{adapter_id}"): Operation(archive=True, errors=(401, 404, 500)),
    ("get", "/health"): Operation(json=Health, probe=True),
    ("get", "/ready"): Operation(json=Readiness, probe=True),
    ("get", "/metrics"): Operation(text=True, errors=(401,)),
    ("get", "/admin/status"): Operation(json=AdminStatus, errors=(401, 403, 500, 503)),
}

NATIVE_EVENTS: dict[str, type[BaseModel]] = {"ttt_step": TrainStepEvent, "agent": AgentTurn, "token": TokenEvent,
                                             "done": RelatResponse, "error": StreamError}


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    """An event's `data` field holding JSON of this schema."""
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


def _chat_event(refs: dict[type[BaseModel], dict], chunk: type[BaseModel] = ChatCompletionChunk) -> dict[str, Any]:
    """OpenAI's chat stream: `data: <chunk>` events, `data: <error>` if it fails after it began, `data: [DONE]`
    (the legacy completions' stream is the same with its own chunk)."""
    chunk_or_error = {"anyOf": [refs[chunk], refs[ErrorResponse]]}
    return {"type": "object", "required": ["data"], "properties": {"event": {"const": "message"}},
            "if": {"properties": {"data": {"const": "[DONE]"}}},
            "else": {"properties": {"data": _json_data(chunk_or_error)}},
            "description": "a chat.completion.chunk, an error once the stream has begun, or [DONE]; training steps "
                           "and finished agents come as SSE comment lines"}


def _native_event(refs: dict[type[BaseModel], dict]) -> dict[str, Any]:
    """The native stream: typed events, each with its own payload."""
    return {"type": "object", "required": ["event", "data"],
            "properties": {"event": {"enum": list(NATIVE_EVENTS)}, "data": {"type": "string"}},
            "allOf": [{"if": {"properties": {"event": {"const": name}}},
                       "then": {"properties": {"data": _json_data(refs[model])}}}
                      for name, model in NATIVE_EVENTS.items()],
            "description": "ttt_step per training step, agent per finished agent, token per piece of the answer, "
                           "then done (the result); error if it fails after the stream began"}


def _responses(operation: Operation, refs: dict[type[BaseModel], dict], needs_key: bool) -> dict[str, Any]:
    headers = {"X-Request-Id": REQUEST_ID}
    success: dict[str, Any] = {"description": "OK", "headers": headers}
    if operation.text:
        success["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif operation.archive:
        success["description"] = "a zip of PEFT's adapter_config.json and adapter_model.safetensors"
        success["content"] = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}
    elif operation.json is not None:
        success["content"] = {"application/json": {"schema": refs[operation.json]}}
    if operation.stream is not None:
        event = _native_event(refs) if operation.stream == "native" else \
            _chat_event(refs, CompletionChunk if operation.stream == "completions" else ChatCompletionChunk)
        success["description"] = "the result, or with `stream: true` an event stream"
        success["content"][SSE] = {"itemSchema": event}
    responses: dict[str, Any] = {"200": success}
    if operation.probe:
        responses["503"] = {"description": "not (or no longer) ready", "headers": headers,
                            "content": {"application/json": {"schema": refs[operation.json]}}}
    for status in operation.errors:
        if (status == 401 and not needs_key) or (status == 403 and needs_key):  # a key needed, or none to give
            continue
        error_headers = {**headers, "Retry-After": {**RETRY_AFTER, "required": True}} if status == 429 else \
            {**headers, "Retry-After": RETRY_AFTER} if status == 503 else headers
        responses[str(status)] = {"description": ERRORS[status], "headers": error_headers,
                                  "content": {"application/json": {"schema": refs[ErrorResponse]}}}
    return responses


def openapi_document(app: FastAPI, models: RequestModels, requires_key: Callable[[str], bool],
                     served: ServedModel | None = None) -> dict[str, Any]:
    """The document: `models` are the classes the app validates request bodies with, `requires_key(path)` says
    whether a path needs an API key, `served` what the loaded model takes (server/served_schema.py). Built once
    per app when the model is loaded (FastAPI serves it from `app.openapi_schema`); before, every model's document
    (the app answers GET /openapi.json with a 503 until then)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    requests = {"chat": models.chat, "native": models.native, "completions": models.completions}
    responses = [ChatCompletionResponse, ChatCompletionChunk, RelatResponse, CompletionResponse, CompletionChunk,
                 ModelList, Health, Readiness,
                 AdminStatus, ErrorResponse, *NATIVE_EVENTS.values()]
    keys, schemas = models_json_schema(
        [(model, "validation") for model in requests.values()]
        + [(model, "serialization") for model in dict.fromkeys(responses)], ref_template=REF_TEMPLATE)
    refs = {model: schema for (model, _mode), schema in keys.items()}
    components: dict[str, Any] = {"schemas": schemas.get("$defs", {})}
    narrow(components["schemas"], served)
    if requires_key("/v1/models"):
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    document["components"] = components
    routes = [(method, path, entry) for path, item in document["paths"].items() for method, entry in item.items()]
    missing = {(method, path) for method, path, _ in routes} ^ set(OPERATIONS)
    if missing:  # a route added without its statuses, or a table entry for a route that is gone
        raise RuntimeError(f"OPERATIONS and the routes differ: {sorted(missing)}")
    for method, path, entry in routes:
        operation = OPERATIONS[method, path]
        needs_key = requires_key(path)
        if needs_key:
            entry["security"] = [{"bearer": []}]
        if operation.request is not None:
            entry["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": refs[requests[operation.request]]}}}
        entry["responses"] = _responses(operation, refs, needs_key)
    used = referenced(document)  # what the model cannot take may leave schemas that nothing names (ChatTool)
    components["schemas"] = {name: schema for name, schema in components["schemas"].items() if name in used}
    if served is not None:
        app.openapi_schema = document
    return document
