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

from dataclasses import dataclass, field
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
    # The server's TTT defaults, which a request's rules across options read where it leaves an option out (method,
    # steps, latent_steps, gate); empty: no such rule is stated.
    defaults: dict[str, Any] = field(default_factory=dict)
    targets: tuple[str, ...] = ()  # the layers the model has, as `targets` names them (empty: not narrowed)


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


def _set(name: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"required": [name], "properties": {name: value}}


def _effective(name: str, value: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A request's option holds `value`: its own, or the server's default where it leaves it out or null."""
    own = _set(name, value)
    if not _holds(defaults.get(name), value):
        return own
    return {"anyOf": [own, {"not": {"required": [name]}}, _set(name, {"type": "null"})]}


def _holds(default: Any, value: dict[str, Any]) -> bool:
    """Whether a default value satisfies one of the simple schemas below (const, enum, minimum)."""
    if default is None:
        return False
    if "const" in value:
        return default == value["const"]
    if "enum" in value:
        return default in value["enum"]
    return "minimum" in value and isinstance(default, (int, float)) and default >= value["minimum"]


def _trains(defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """An options object that asks for training: method relat with at least one step."""
    return [_effective("method", {"const": "relat"}, defaults), _effective("steps", {"minimum": 1}, defaults)]


def _option_rules(component: dict[str, Any], served: ServedModel) -> None:
    """The rules across TTT options, over the server's defaults: relat needs a latent step; return_adapter needs
    an adapter (method relat, steps >= 1); and `targets` names only the layers the model has."""
    properties = component.get("properties", {})
    defaults = served.defaults
    rules = []
    if defaults and "method" in properties and "latent_steps" in properties:
        rules.append({"if": _effective("method", {"const": "relat"}, defaults),
                      "then": _effective("latent_steps", {"minimum": 1}, defaults)})
    if defaults and "return_adapter" in properties:
        rules.append({"if": _set("return_adapter", {"const": True}), "then": {"allOf": _trains(defaults)}})
    if rules:
        component.setdefault("allOf", []).extend(rules)
    if served.targets:
        for branch in _non_null(properties.get("targets", {})):
            items = branch.get("items", {})
            if "enum" in items:
                items["enum"] = [name for name in items["enum"] if name in served.targets]


def _draftless(component: dict[str, Any], served: ServedModel) -> None:
    """/v1/completions: a request that decodes no answer of its own (max_tokens 0, or continuations) cannot train
    behind a gate that reads a draft of it (confidence, auto)."""
    if not served.defaults or "relat" not in component.get("properties", {}):
        return
    decodes_none = {"anyOf": [_set("max_tokens", {"const": 0}),
                              _set("relat", {"type": "object", "required": ["continuations"],
                                             "properties": {"continuations": {"type": "array"}}})]}
    drafted = {"allOf": [*_trains(served.defaults),
                         _effective("gate", {"enum": ["confidence", "auto"]}, served.defaults)]}
    own = _set("relat", {"type": "object", "not": drafted})
    defaults_draft = all(_holds(served.defaults.get(name), value) for name, value in
                         (("method", {"const": "relat"}), ("steps", {"minimum": 1}),
                          ("gate", {"enum": ["confidence", "auto"]})))
    allowed = own if defaults_draft else {"anyOf": [own, {"not": {"required": ["relat"]}},
                                                    _set("relat", {"type": "null"})]}
    component.setdefault("allOf", []).append({"if": decodes_none, "then": allowed})


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
    for name in OPTION_COMPONENTS:
        if name in schemas:
            _option_rules(schemas[name], served)
    if "CompletionRequest" in schemas:
        _draftless(schemas["CompletionRequest"], served)
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
