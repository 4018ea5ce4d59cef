"""The request schemas of the OpenAPI document narrowed to the model being served (server/openapi.py calls it).

The classes the server validates with are the same for every model; what one model cannot take (Huginn's
recurrence options on a transformer, tools on a chat template without tool support) is left out of its document
rather than declared and then refused, and what its sizes bound (token ids below its vocabulary, an answer within
its context) is stated there. The classes are not narrowed themselves: a chat request allows unknown top-level
fields (logged and listed as ignored), so a `tools` dropped from its class would be silently ignored instead of the
400 that the engine answers (Engine.check names the field); the document only stops offering it.

Rules across fields that a JSON schema can state (`if`/`then`) are added here too, for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relat_core.params import RECURRENCE_OPTIONS

# The top-level chat fields that only a chat template with tool support can take.
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
# The components that hold the request options a model may not take (the TTT options, at the native top level too).
OPTION_COMPONENTS = ("RelatOptions", "RelatRequest", "CompletionRelatOptions")
REQUEST_COMPONENTS = ("ChatCompletionRequest", "RelatRequest", "CompletionRequest")


@dataclass(frozen=True)
class ServedModel:
    """What the document says of the loaded model (Service.served_model)."""

    recurrent: bool  # a recurrent-depth model (Huginn): it takes RECURRENCE_OPTIONS
    tools: bool  # its chat template writes tools into the prompt
    vocabulary: int  # token ids (logit_bias keys, a prompt's ids) are below it
    context_length: int | None  # prompt + answer, in tokens


def below(limit: int) -> str:
    """A regex for the decimal integers 0 .. limit - 1, leading zeros allowed (the server reads "007" as 7)."""
    digits = str(limit - 1)
    branches = [f"[0-9]{{1,{len(digits) - 1}}}"] if len(digits) > 1 else []  # the shorter numbers
    for i, digit in enumerate(digits):  # same length: equal up to i, then a smaller digit, then any
        if digit != "0":
            rest = len(digits) - i - 1
            branches.append(digits[:i] + f"[0-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    branches.append(digits)
    return f"^0*(?:{'|'.join(branches)})$"


def _non_null(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The branches of an optional field's schema other than its null."""
    return [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]


def _drop(component: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        component.get("properties", {}).pop(name, None)
    if "required" in component:
        component["required"] = [name for name in component["required"] if name not in names]


def _cross_field_rules(component: dict[str, Any]) -> None:
    """What needs logprobs asked for (a 400 naming the field otherwise): top_logprobs above 0 (OpenAI's rule), and
    relat's logprob_shift: true (it adds to them), at the top level or in the `relat` object."""
    properties = component.get("properties", {})
    if "logprobs" not in properties:
        return
    # logprobs: true on the chat and native endpoints; any number on the legacy completions (its top k).
    asked = {"const": True} if any(b.get("type") == "boolean" for b in _non_null(properties["logprobs"])) \
        else {"type": "integer"}
    needs_logprobs = {"required": ["logprobs"], "properties": {"logprobs": asked}}
    shift = {"required": ["logprob_shift"], "properties": {"logprob_shift": {"const": True}}}
    rules = []
    if "top_logprobs" in properties:
        rules.append({"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}})
    if "logprob_shift" in properties:
        rules.append(shift)
    if "relat" in properties:
        rules.append({"required": ["relat"], "properties": {"relat": {"type": "object", **shift}}})
    component.setdefault("allOf", []).extend({"if": rule, "then": needs_logprobs} for rule in rules)


def _sized(component: dict[str, Any], served: ServedModel) -> None:
    """Token ids below the vocabulary; an answer's length below the context (every prompt has a token at least:
    more than that is refused whatever the prompt; how much a given prompt leaves no schema can say)."""
    properties = component.get("properties", {})
    for branch in _non_null(properties.get("logit_bias", {})):
        branch["propertyNames"] = {"pattern": below(served.vocabulary)}
    for branch in _non_null(properties.get("prompt", {})):  # /v1/completions: a list of ids, or of lists of ids
        items = branch.get("items", {})
        ids = items.get("items", items)
        if ids.get("type") == "integer":
            ids["maximum"] = served.vocabulary - 1
    if served.context_length is not None:
        for name in ("max_tokens", "max_completion_tokens"):
            for branch in _non_null(properties.get(name, {})):
                if branch.get("type") == "integer":
                    branch["maximum"] = min(branch.get("maximum", served.context_length), served.context_length - 1)


def narrow(schemas: dict[str, dict[str, Any]], served: ServedModel | None) -> None:
    """Narrow the document's component schemas (in place) to the served model; with none (not loaded yet), the
    document describes every model the server could load, with only the rules across fields added."""
    for name in REQUEST_COMPONENTS:
        if name in schemas:
            _cross_field_rules(schemas[name])
            if served is not None:
                _sized(schemas[name], served)
    if served is None:
        return
    if not served.recurrent:
        for name in OPTION_COMPONENTS:
            if name in schemas:
                _drop(schemas[name], RECURRENCE_OPTIONS)
    if not served.tools and "ChatCompletionRequest" in schemas:
        _drop(schemas["ChatCompletionRequest"], TOOL_FIELDS)


def referenced(document: dict[str, Any]) -> set[str]:
    """The component schemas that the paths reach, directly or through other components."""
    schemas = document["components"]["schemas"]
    seen: set[str] = set()
    stack: list[Any] = [document["paths"]]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in seen:
                    seen.add(name)
                    stack.append(schemas[name])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return seen
