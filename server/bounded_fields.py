"""Field types bounded as the engine bounds them: `bounded(name)` turns relat_core/params.py's range of a numeric
parameter into a pydantic type whose check and JSON schema both come from it, optionally narrowed by a server's limit.

The settings, the TTT options (server/ttt_options.py) and the request models (server/protocol.py,
server/completions_protocol.py) take their numeric fields from here; `invalid` words a validation error as the
engine does.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from relat_core.params import SAMPLING_BOUNDS, TTT_BOUNDS

BOUNDS = {**TTT_BOUNDS, **SAMPLING_BOUNDS}


def invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is ours (the engine's wording) rather than pydantic's."""
    return PydanticCustomError("invalid_value", "{message}", {"message": message})


def _integral(value: Any) -> Any:
    """2.0 as 2: JSON Schema's integers include numbers with a zero fraction, and strict validation would refuse
    them (a fraction is still refused)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JSONInteger = Annotated[int, BeforeValidator(_integral)]


def bounded(name: str, limit: int | None = None) -> Any:
    """The type of the numeric parameter `name` as relat_core.params bounds it and, with `limit`, as a server
    setting bounds it further. The check and the JSON schema's range both come from that one Bound, so that the
    OpenAPI document cannot promise what validation refuses; the messages are the engine's."""
    bound = BOUNDS[name]
    schema = bound.json_schema()
    if limit is not None:
        schema.pop("exclusiveMaximum", None)
        schema["maximum"] = limit

    def check(value: float) -> float:
        if not bound.holds(value):
            raise invalid(bound.message(name, value))
        if limit is not None and value > limit:
            raise invalid(f"{name} must be at most {limit} on this server, got {value!r}")
        return value

    return Annotated[JSONInteger if bound.integer else float, AfterValidator(check), WithJsonSchema(schema)]
