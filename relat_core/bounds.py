"""A numeric parameter's range (`Bound`), stated once: checked, described in messages and help, and as JSON Schema.

The ranges themselves are relat_core/params.py's tables (`TTT_BOUNDS`, `SAMPLING_BOUNDS`, `LOGIT_BIAS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """The range of a numeric parameter, stated once: relat_core/params.py's dataclasses check it, and the server
    generates its request validation and its OpenAPI document's minimum/maximum from it (server/bounded_fields.py),
    so that the API cannot promise what the engine refuses."""

    low: float | None = None  # None: unbounded
    high: float | None = None
    low_open: bool = False  # (low, ... rather than [low, ...
    high_open: bool = False
    integer: bool = False

    def holds(self, value: object) -> bool:
        if not (is_int(value) if self.integer else _is_number(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """'an integer in [0, 256]', 'in (0, 1]', 'positive', 'a non-negative integer', ..."""
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            span = f"{opening}{_number(self.low)}, {_number(self.high)}{closing}"
            return f"an integer in {span}" if self.integer else f"in {span}"
        if self.low is None:
            return kind
        positive = self.low_open if self.low == 0 else (self.integer and self.low == 1 and not self.low_open)
        if self.low == 0 or positive:
            word = "positive" if positive else "non-negative"
            return f"a {word} integer" if self.integer else word
        return f"{kind} {'greater than' if self.low_open else 'at least'} {_number(self.low)}"

    def message(self, name: str, value: object) -> str:
        return f"{name} must be {self.describe()}, got {value!r}"

    def json_schema(self) -> dict[str, object]:
        """The range in JSON Schema (2020-12, as OpenAPI 3.1 has it)."""
        schema: dict[str, object] = {"type": "integer" if self.integer else "number"}
        if self.low is not None:
            schema["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            schema["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return schema


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
