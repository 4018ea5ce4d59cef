"""Errors: the server's own exception classes and the one place that maps any exception to an HTTP answer.

Every error body has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. Only the exception
classes listed in `describe` become client errors; anything else is a server bug and becomes a 500 whose body
says nothing about it (the stack trace goes to the log), unlike servers that map every ValueError to 400.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from typing import ClassVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from relat_core import EngineBusy, InvalidParameter

log = logging.getLogger("relat_server")


class APIError(Exception):
    """An error the client caused or can act on; subclasses fix the status, type and code."""

    status = 500
    type = "server_error"
    code: str | None = None
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.param = param
        self.retry_after = retry_after


class BadRequest(APIError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class ContextLengthExceeded(BadRequest):
    """The prompt and the answer asked for do not fit in the model's context."""

    code = "context_length_exceeded"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}  # RFC 9110: a 401 names the scheme it wants


class Forbidden(APIError):
    """The route needs a key and this server has none set (the admin route)."""

    status, type, code = 403, "permission_error", "keys_required"


class ModelNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class AdapterNotFound(APIError):
    """GET /v1/adapters/{id}: no such adapter kept (never, expired, or evicted by newer ones)."""

    status, type, code = 404, "invalid_request_error", "adapter_not_found"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class PromptTooLong(APIError):
    status, type, code = 413, "invalid_request_error", "context_length_exceeded"


class QueueFull(APIError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class RateLimited(QueueFull):
    """The tenant's requests-per-minute limit (server/fair_queue.py); Retry-After: seconds until it may send one."""

    code = "rate_limited"


class Unavailable(APIError):
    """Loading, draining or failed: the request never reached the engine."""

    status, type, code = 503, "service_unavailable", "not_ready"


class Cancelled(Unavailable):
    """The server stopped the request (shutting down); a client that cancels is no longer there to be told."""

    code = "cancelled"


class DeadlineExceeded(APIError):
    status, type, code = 504, "timeout_error", "deadline_exceeded"


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault, as sent: 'relat.steps', 'messages[0].role'")
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every error response, and the event of an error in a chat stream."""

    error: ErrorObject


class StreamError(ErrorResponse):
    """The `error` event of a native stream: the error and the HTTP status it would have had."""

    status: int


@dataclass
class ErrorInfo:
    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        error = ErrorObject(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()

    def json(self) -> str:
        return json.dumps(self.body())


# Pydantic puts the member of a union it tried into the location ("str", "list[str]", "constrained-str", ...);
# clients know fields.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(location: tuple) -> str | None:
    """('relat', 'steps') -> 'relat.steps'; ('messages', 0, 'content', 'str') -> 'messages[0].content'."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "body" and part not in _UNION_TAGS and "[" not in part and not part.startswith("constrained-"):
            text += f".{part}" if text else part
    return text or None


def _suggestion(location: tuple) -> str:
    """'; did you mean latent_steps?' for an unknown field of the `relat` object or the native request, when a
    known field is close to it; '' otherwise."""
    from .protocol import RelatOptions, RelatRequest  # the request models import this module's errors

    name = str(location[-1])
    known = RelatOptions.model_fields if "relat" in location[:-1] else RelatRequest.model_fields
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _most_specific(errors: list[dict]) -> dict:
    """Of the errors pydantic reports (one per union member tried), the deepest one, and not a mere "missing"."""
    def depth(error: dict) -> tuple[int, bool]:
        param = _param(tuple(error.get("loc", ())))
        return (param or "").count(".") + (param or "").count("["), error.get("type") != "missing"

    return max(reversed(errors), key=depth)  # reversed: among equals, the later union member (the richer type)


def describe(error: BaseException) -> ErrorInfo:
    """The one mapping from an exception to status, OpenAI error object and headers."""
    if isinstance(error, APIError):
        headers = dict(error.headers)
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        return ErrorInfo(error.status, str(error), error.type, error.param, error.code, headers)
    if isinstance(error, InvalidParameter):  # relat_core's own parameter checks
        return ErrorInfo(400, str(error), "invalid_request_error", error.param, "invalid_value")
    if isinstance(error, ValidationError | RequestValidationError):  # 400 like vLLM, not FastAPI's 422
        chosen = _most_specific(error.errors())
        location = tuple(chosen.get("loc", ()))
        param = _param(location)
        message = chosen["msg"] if param is None else f"{param}: {chosen['msg']}"
        if chosen.get("type") == "extra_forbidden" and param is not None:
            message = f"{param}: unknown field" + _suggestion(location)
        return ErrorInfo(400, message, "invalid_request_error", param, "invalid_value")
    if isinstance(error, EngineBusy):  # no adapter slot free: transient, like a full queue
        return ErrorInfo(503, "no adapter slot is free; retry shortly", "service_unavailable", None, "engine_busy",
                         {"Retry-After": "1"})
    if isinstance(error, HTTPException):  # Starlette's routing: unknown path, wrong method
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return ErrorInfo(error.status_code, str(error.detail), kind, None, code, dict(error.headers or {}))
    log.error("internal error", exc_info=error)
    return ErrorInfo(500, "internal server error", "server_error", None, "internal_error")
