"""Turning chat messages into the token segments of a request, through the model's own chat template.

The segments around the latent thought are cut out of templates rendered with marker strings, so any chat
template works (ChatML for SmolLM2 and Qwen, Llama's own, ...) without a table of special tokens per family:

    prompt (question)  | L latents | reconstruction: turn end, user turn with the instruction, assistant turn, Q
                       |           | follow-up: turn end and assistant turn (bridge), or a user turn restating Q
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

from transformers import PreTrainedTokenizerBase

from .params import InvalidParameter

_LATENT = "\ue000relat-latent\ue000"  # private-use characters: never in real text
_NEXT = "\ue000relat-next\ue000"


@dataclass
class Segments:
    prompt_ids: list[int]
    question_start: int  # prompt positions from here on carry the question: hidden from the reconstruction
    recon_ids: list[int]  # reconstruction instruction, then the question's tokens
    recon_labels: list[int]  # next-token targets on the question's tokens, -100 elsewhere
    follow_ids: list[int]  # between the latent thought (or the prompt, for `direct`) and the answer
    question: str
    question_end: int = 0  # the prompt's question tokens are [question_start, question_end) (objective prompt_lm)


def normalise_messages(messages: list[dict]) -> list[dict]:
    """Validate roles and flatten OpenAI content parts into plain strings; an assistant turn's tool calls and a tool
    result's id are kept in the shape chat templates read (arguments as an object where they parse as one)."""
    if not messages:
        raise InvalidParameter("messages", "messages must not be empty")
    result = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidParameter(f"messages[{index}].role", f"unsupported role {role!r}")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidParameter(f"messages[{index}].content", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidParameter(f"messages[{index}].content", "content must be a string or a list of text parts")
        normalised: dict = {"role": "system" if role == "developer" else role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            normalised["tool_calls"] = [_tool_call(call) for call in message["tool_calls"]]
        if role == "tool" and message.get("tool_call_id") is not None:
            normalised["tool_call_id"] = message["tool_call_id"]
        result.append(normalised)
    # The question is the last user message: the conversation ends with it, or with tool results (answering the
    # assistant's calls that followed it).
    ends_with_tools = result[-1]["role"] == "tool"
    users = [m for m in result if m["role"] == "user"]
    if (not ends_with_tools and result[-1]["role"] != "user") or not users or not users[-1]["content"].strip():
        raise InvalidParameter("messages", "the last message must be a non-empty user message (the question), or "
                               "tool results after it")
    return result


def question_index(messages: list[dict]) -> int:
    """Where the question is: the last user message (normalise_messages has checked there is one)."""
    return max(i for i, message in enumerate(messages) if message["role"] == "user")


def _tool_call(call: dict) -> dict:
    """An assistant turn's tool call as templates read it: the function's arguments as an object (OpenAI sends a
    JSON string; Qwen's and Hermes' templates write the object out with tojson)."""
    function = call.get("function") or {}
    arguments = function.get("arguments", "")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        parsed = arguments
    return {"id": call.get("id"), "type": "function",
            "function": {"name": function.get("name"), "arguments": parsed}}


class ChatFormat:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    @cached_property
    def supports_tools(self) -> bool:
        """Whether the template writes tools into the prompt (a template that ignores them would leave the model
        unaware of the tools it is asked to call)."""
        probe = {"type": "function", "function": {"name": "relat_probe_tool", "description": "a probe",
                                                  "parameters": {"type": "object", "properties": {}}}}
        try:
            text = self._render([{"role": "user", "content": "hi"}], True, [probe])
        except Exception:  # a template that fails on tools has no tool support either
            return False
        return "relat_probe_tool" in text

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _between(self, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
        """Template text that follows an assistant turn holding the latent thought, up to the next marker."""
        text = self._render(messages, generation_prompt, tools)
        start = text.index(_LATENT) + len(_LATENT)
        end = text.find(_NEXT, start)
        return text[start:] if end < 0 else text[start:end]

    def prompt(self, messages: list[dict[str, str]], question: str) -> tuple[list[int], int]:
        """The prompt's tokens (ending with the assistant turn's opening) and the index of the first token of the
        question's last occurrence in it, where what the reconstruction must not see begins."""
        prompt_ids, question_start, _ = self._question_in_prompt(messages, question)
        return prompt_ids, question_start

    def _question_in_prompt(self, messages: list[dict], question: str, tools: list[dict] | None = None
                            ) -> tuple[list[int], int, int]:
        """The prompt's tokens and the span [start, end) of the tokens that hold the question's last occurrence
        (those overlapping its characters, as the chat template places them)."""
        prompt_text = self._render(messages, True, tools)
        encoded = self.tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
        prompt_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        question_char = prompt_text.rfind(question)
        if question_char < 0:
            return prompt_ids, 1, len(prompt_ids)
        # Everything from the question's first token on is hidden: later prompt tokens have attended to it.
        question_start = next((i for i, (_, end) in enumerate(offsets) if end > question_char), len(prompt_ids))
        question_end = next((i for i, (start, _) in enumerate(offsets)
                             if i >= question_start and start >= question_char + len(question)), len(prompt_ids))
        return prompt_ids, question_start, question_end

    def segments(self, messages: list[dict], reconstruction_instruction: str, follow_up: str,
                 latent: bool, tools: list[dict] | None = None) -> Segments:
        question = messages[question_index(messages)]["content"]
        prompt_ids, question_start, question_end = self._question_in_prompt(messages, question, tools)

        with_latent = messages + [{"role": "assistant", "content": _LATENT}]
        instruction = self._between(with_latent + [{"role": "user", "content": reconstruction_instruction},
                                                   {"role": "assistant", "content": _NEXT}], False, tools)
        instruction_ids = self._encode(instruction)
        question_ids = self._encode(question)
        recon_ids = instruction_ids + question_ids
        recon_labels = [-100] * (len(instruction_ids) - 1) + question_ids + [-100]

        if not latent:
            follow = ""
        elif follow_up == "bridge":
            follow = self._between(with_latent, True, tools)
        else:
            follow = self._between(with_latent + [{"role": "user", "content": question}], True, tools)
        return Segments(prompt_ids, question_start, recon_ids, recon_labels, self._encode(follow), question,
                        question_end)


def raw_segments(tokenizer: PreTrainedTokenizerBase, prompt: str | list[int], reconstruction_instruction: str,
                 follow_up: str, latent: bool) -> Segments:
    """The segments of a raw prompt (a legacy completion: text, or token ids, read as it is, no chat template).
    The whole prompt is the question: the reconstruction rebuilds all of it after a plain-text instruction, and
    the thought and the answer follow it. The follow-up is nothing ("bridge": the answer continues right after
    the thought) or the prompt again ("restate"), as a chat restates the question in a user turn.

    Text is tokenized as vLLM tokenizes a completion's prompt (with the tokenizer's special tokens, a BOS where it
    adds one); token ids are taken as sent."""
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        question_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        question = prompt
    else:
        prompt_ids = question_ids = list(prompt)
        question = tokenizer.decode(prompt_ids)
    if not question_ids:
        raise InvalidParameter("prompt", "the prompt must hold at least one token")
    instruction_ids = tokenizer(f"\n\n{reconstruction_instruction}\n", add_special_tokens=False)["input_ids"]
    recon_ids = instruction_ids + question_ids
    recon_labels = [-100] * (len(instruction_ids) - 1) + question_ids + [-100]
    follow_ids = question_ids if latent and follow_up == "restate" else []
    return Segments(prompt_ids, 0, recon_ids, recon_labels, list(follow_ids), question, len(prompt_ids))
