"""Structured outputs and tools on the wire: OpenAI's `response_format`, `tools` and `tool_choice`, turned into the
engine's StructuredOutput and Request.tools, and the reply's tool calls parsed back out of the answer's text.

The answer is constrained only where the request demands it, as vLLM does:
- `response_format` json_schema / json_object: the answer is that JSON;
- `tool_choice` naming a function: the answer is its arguments (a JSON object valid against its parameters);
- `tool_choice: "required"`: the answer is a JSON array of one or more {"name", "parameters"} calls;
- `tool_choice: "auto"` (the default with tools): free; calls the model writes in its template's format are parsed
  out of the text. relat parses the Hermes format (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, which
  Qwen2.5 and Qwen3 write); a template that supports tools in another format is served `required` and named
  choices, and refused `auto` rather than answered with unparsed calls as text;
- `tool_choice: "none"`: the tools are left out of the prompt (the model cannot call what it is not shown).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from relat_core import InvalidParameter
from relat_core.params import StructuredOutput

from .settings import invalid

FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*" + re.escape(HERMES_CLOSE), re.DOTALL)


def _none(value: object) -> bool:
    return value is None


class _Wire(BaseModel):
    # OpenAI's nested objects: strict types, unknown fields ignored (a newer SDK may send more).
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)


# -- requests -------------------------------------------------------------------------------------------------

class JsonSchemaFormat(_Wire):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer must follow")
    strict: bool | None = Field(None, description="accepted; the answer always follows the schema")


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise invalid("response_format of type json_schema needs its json_schema object")
        return self


class FunctionDefinition(_Wire):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments (an object)")
    strict: bool | None = None


class ChatTool(_Wire):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallParam(_Wire):
    """An assistant turn's tool call, sent back in a later request's messages."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


# -- the stream's pieces --------------------------------------------------------------------------------------

class DeltaFunctionCall(BaseModel):
    name: str | None = Field(None, exclude_if=_none)
    arguments: str | None = Field(None, exclude_if=_none)


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = Field(None, exclude_if=_none)
    type: Literal["function"] | None = Field(None, exclude_if=_none)
    function: DeltaFunctionCall


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- request -> engine ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolUse:
    """How a request's answer treats its tools: `mode` "auto" (calls parsed from the text in Hermes' format),
    "required" or "named" (the function `name`); `names` are the tools'."""

    mode: Literal["auto", "required", "named"]
    names: tuple[str, ...]
    name: str | None = None
    parallel: bool = True  # OpenAI's parallel_tool_calls: False allows one call at most


@dataclass(frozen=True)
class AnswerShape:
    """What the engine is asked for: the structured output, the tools the template renders, and how the reply's
    text is read back (None: as the answer's content)."""

    structured_output: StructuredOutput | None = None
    tools: list[dict] | None = None
    tool_use: ToolUse | None = None


def answer_shape(response_format: ResponseFormat | None, tools: list[ChatTool] | None,
                 tool_choice: ToolChoice | None, template: ToolTemplate, parallel: bool | None = None) -> AnswerShape:
    """The request's response_format, tools and tool_choice as the engine takes them; a combination that cannot
    be served is a 400 that names the field."""
    structured = None
    if response_format is not None and response_format.type == "json_object":
        structured = StructuredOutput(json_object=True)
    elif response_format is not None and response_format.type == "json_schema":
        structured = StructuredOutput.from_schema(response_format.json_schema.schema_)
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise InvalidParameter("tool_choice", "tool_choice needs tools")
        return AnswerShape(structured)
    if not template.supported:
        raise InvalidParameter("tools", "the model's chat template has no tool support: it does not write tools "
                               "into the prompt")
    names = [tool.function.name for tool in tools]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise InvalidParameter("tools", f"two tools are named {duplicate!r}")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return AnswerShape(structured)
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise InvalidParameter("tool_choice", f"tool_choice names {choice.function.name!r}, which is not one of "
                                   f"the tools ({', '.join(names)})")
        _no_both(structured)
        tool = tools[names.index(choice.function.name)]
        schema = tool.function.parameters or {"type": "object", "properties": {}}
        return AnswerShape(StructuredOutput.from_schema(schema, field="tools"), template_tools,
                           ToolUse("named", tuple(names), tool.function.name))
    if choice == "required":
        _no_both(structured)
        schema = _required_schema(tools, parallel is not False)
        return AnswerShape(StructuredOutput.from_schema(schema, field="tools"), template_tools,
                           ToolUse("required", tuple(names), parallel=parallel is not False))
    if template.parser is None:
        raise InvalidParameter("tool_choice", "tool_choice auto needs the model's tool calls in a format relat "
                               "parses (Hermes <tool_call> tags); this model's template writes another: use "
                               "tool_choice required, or name a function")
    return AnswerShape(structured, template_tools, ToolUse("auto", tuple(names), parallel=parallel is not False))


def _no_both(structured: StructuredOutput | None) -> None:
    if structured is not None:
        raise InvalidParameter("response_format", "a JSON response_format and a forced tool call (tool_choice "
                               "required or a named function) each constrain the whole answer: send one")


def _required_schema(tools: list[ChatTool], parallel: bool) -> dict:
    """One or more calls (exactly one unless parallel), each {"name": one of the tools, "parameters": its
    arguments} (vLLM's form)."""
    calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                               "parameters": tool.function.parameters or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for tool in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **({} if parallel else {"maxItems": 1})}


@dataclass(frozen=True)
class ToolTemplate:
    """What the served model's chat template does with tools: writes them into the prompt (`supported`), and in
    which format its model writes calls, when relat parses it (`parser`: "hermes", Hermes' <tool_call> tags)."""

    supported: bool = False
    parser: str | None = None

    @classmethod
    def of(cls, chat_template: str | None, supported: bool) -> ToolTemplate:
        return cls(supported, "hermes" if supported and chat_template and HERMES_OPEN in chat_template else None)


# -- engine -> reply ------------------------------------------------------------------------------------------

def parse_reply(text: str, use: ToolUse | None) -> tuple[str | None, list[ToolCall]]:
    """The answer's content and tool calls. A forced call that the length limit cut short is returned as text
    (its JSON does not parse), so the client sees what was written."""
    if use is None:
        return text, []
    if use.mode == "named":
        return None, [ToolCall(id=tool_call_id(), function=FunctionCall(name=use.name, arguments=text))]
    if use.mode == "required":
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return text, []
        return None, [ToolCall(id=tool_call_id(), function=FunctionCall(
            name=call["name"], arguments=json.dumps(call["parameters"], ensure_ascii=False))) for call in calls]
    calls = []
    for match in _HERMES_CALL.finditer(text):
        call = _hermes_call(match.group(1), use)
        if call is not None and (use.parallel or not calls):  # without parallel calls, the first is the call
            calls.append(call)
    if not calls:
        return text, []
    content = _HERMES_CALL.sub("", text).strip()
    return content or None, calls


def _hermes_call(body: str, use: ToolUse) -> ToolCall | None:
    """One <tool_call> body, {"name": ..., "arguments": {...}}; None when it is not one (it stays in the text)."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or call.get("name") not in use.names:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return ToolCall(id=tool_call_id(), function=FunctionCall(
        name=call["name"], arguments=arguments if isinstance(arguments, str)
        else json.dumps(arguments, ensure_ascii=False)))


@dataclass
class ToolStream:
    """One answer's stream when it may call tools: text deltas in, content and tool-call deltas out.

    A named call streams its arguments as they are written (its header first); `required` calls go out whole at
    the end (the JSON array is parsed once); under `auto`, content streams until a <tool_call> may begin, and each
    call goes out whole as its closing tag arrives."""

    use: ToolUse
    text: str = ""  # everything the answer has written
    sent: int = 0  # characters of `text` handled (as content or as a call)
    calls: int = 0  # tool calls sent

    def feed(self, delta: str) -> list[tuple[str | None, DeltaToolCall | None]]:
        """(content, tool call delta) pairs to send for this text delta."""
        self.text += delta
        if self.use.mode == "named":
            out = []
            if self.calls == 0:
                self.calls = 1
                out.append((None, DeltaToolCall(index=0, id=tool_call_id(), type="function",
                                                function=DeltaFunctionCall(name=self.use.name, arguments=""))))
            if delta:
                out.append((None, DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta))))
            self.sent = len(self.text)
            return out
        if self.use.mode == "required":
            return []
        return self._auto(final=False)

    def finish(self) -> list[tuple[str | None, DeltaToolCall | None]]:
        """What is left once the answer has ended."""
        if self.use.mode == "named":
            return [] if self.calls else self.feed("")
        if self.use.mode == "required":
            content, calls = parse_reply(self.text, self.use)
            self.calls = len(calls)
            if not calls:
                return [(content, None)]
            return [(None, self._whole(i, call)) for i, call in enumerate(calls)]
        return self._auto(final=True)

    def _auto(self, final: bool) -> list[tuple[str | None, DeltaToolCall | None]]:
        out: list[tuple[str | None, DeltaToolCall | None]] = []
        while True:
            rest = self.text[self.sent:]
            start = rest.find(HERMES_OPEN)
            if start < 0:
                # Hold back a tail that may still become "<tool_call>".
                keep = 0 if final else next((k for k in range(min(len(HERMES_OPEN) - 1, len(rest)), 0, -1)
                                             if rest.endswith(HERMES_OPEN[:k])), 0)
                if len(rest) - keep > 0:
                    self._content(out, rest[:len(rest) - keep])
                return out
            if start > 0:
                self._content(out, rest[:start])
                continue
            end = rest.find(HERMES_CLOSE)
            if end < 0:
                if final:  # an unclosed call: the text it is
                    out.append((rest, None))
                    self.sent = len(self.text)
                return out
            block = rest[:end + len(HERMES_CLOSE)]
            call = _hermes_call(block[len(HERMES_OPEN):-len(HERMES_CLOSE)].strip(), self.use)
            if call is not None and self.calls and not self.use.parallel:  # one call at most: the rest is dropped
                self.sent += len(block)
                continue
            out.append((None, self._whole(self.calls, call)) if call is not None else (block, None))
            self.calls += call is not None
            self.sent += len(block)

    def _content(self, out: list, text: str) -> None:
        """Text outside the calls; once a call has gone out, the whitespace between calls is not content."""
        self.sent += len(text)
        if text.strip() or not self.calls:
            out.append((text, None))

    @staticmethod
    def _whole(index: int, call: ToolCall) -> DeltaToolCall:
        return DeltaToolCall(index=index, id=call.id, type="function",
                             function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
