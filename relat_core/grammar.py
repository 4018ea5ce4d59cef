"""Structured outputs: the answer constrained to a JSON schema, or to any JSON object, by a grammar's token mask.

The backend is xgrammar (vLLM's default). It compiles a JSON schema against the tokenizer's vocabulary in
milliseconds, caches what it compiled, and fills a row's mask of allowed next tokens in tens of microseconds on a
CPU, so a constrained row and a free row share one forward of the decoding batch and only the constrained row's
logits are masked. llguidance would serve as well (and is lighter to install: it needs no torch); xgrammar was
chosen because it is the backend vLLM users already know, with the same JSON-schema coverage and errors.

Only the answer is constrained: latent steps, training and a TextMAS agent's text for the agents after it are not.
Whitespace between JSON tokens is off by default (compact JSON): a small model left free to write whitespace
inside an object can fill its whole budget with it (vLLM offers the same switch as `disable_any_whitespace`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .params import InvalidParameter, StructuredOutput

# xgrammar's errors start with a timestamp and a C++ source location: the client needs only the reason.
_NATIVE_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


class Grammars:
    """The grammar backend of one engine: the tokenizer's vocabulary read once (at start-up, not per request), and
    a compiler whose cache keeps each schema compiled once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocabulary: int, stop_ids: set[int]):
        import xgrammar  # about a second to import: only engines that serve a structured output pay it

        self._xgrammar = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocabulary,
                                                       stop_token_ids=sorted(stop_ids))
        self.vocabulary = vocabulary
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self._lock = threading.Lock()  # check() compiles on the server's threads, the engine on its own

    def compile(self, output: StructuredOutput):
        """The compiled grammar, or InvalidParameter naming the request's field when the backend cannot compile
        it (an unsupported keyword, a broken $ref, a schema that is not JSON)."""
        try:
            with self._lock:
                # OpenAI's json_object is an object (xgrammar's built-in JSON grammar would allow any value).
                schema = '{"type": "object"}' if output.json_object else output.json_schema
                return self._compiler.compile_json_schema(schema, any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as error:
            reason = _NATIVE_PREFIX.sub("", str(error).strip().splitlines()[0] if str(error).strip() else "")
            raise InvalidParameter(output.field, f"the JSON schema cannot be compiled: {reason or error!r}") from None

    def matcher(self, output: StructuredOutput) -> RowGrammar:
        """A fresh matcher for one answer (every answer row of a request has its own)."""
        return RowGrammar(self._xgrammar.GrammarMatcher(self.compile(output)))

    def mask(self, logits: torch.Tensor, rows: dict[int, RowGrammar]) -> None:
        """Mask, in place, the logits (B, V) of the rows (index -> grammar) to the tokens each grammar allows next;
        the other rows' logits are left as they are."""
        if not rows:
            return
        xgrammar = self._xgrammar
        bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], self.vocabulary)
        for index, grammar in rows.items():
            grammar.matcher.fill_next_token_bitmask(bitmask, index)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocabulary,
                                             indices=sorted(rows))


@dataclass(eq=False)
class RowGrammar:
    """One answer's place in its grammar: it advances by each token the answer takes."""

    matcher: object  # xgrammar.GrammarMatcher

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            # The mask allowed only tokens the grammar accepts: a refusal here is a bug, not the client's input.
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed")

    @property
    def complete(self) -> bool:
        """The answer has matched the whole grammar (only a stop token may follow)."""
        return self.matcher.is_completed()
