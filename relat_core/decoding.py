"""Token sampling and incremental detokenisation for streaming."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from .params import SamplingParams


def shape_logits(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """One row of logits (V,) with OpenAI's penalties over the tokens generated so far and its logit_bias applied:
    mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty + bias[j], c[j] the count of token j."""
    if not params.shapes_logits:
        return logits
    logits = logits.clone()
    if generated and (params.presence_penalty or params.frequency_penalty):
        tokens, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
        logits[tokens] -= counts.to(logits.dtype) * params.frequency_penalty + params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token from one row of logits (V,): greedy at temperature 0, else temperature, top-k, then top-p."""
    if params.greedy:
        return int(logits.argmax())
    # Shifted by the maximum (the distribution is the same) over a temperature no smaller than float32 can hold: a
    # tiny temperature then makes the likeliest token certain, where it would overflow to inf - inf = nan.
    logits = logits.float()
    logits = (logits - logits.max()) / max(params.temperature, torch.finfo(logits.dtype).tiny)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        drop[0] = False  # the likeliest token stays however small top_p is (in float32 a tiny one rounds to 0)
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character or leak a stop string.

    Decoding token by token breaks multi-byte characters (a byte-level BPE token can hold half of one) and loses
    the spaces that some tokenizers add only in context, so each step decodes a short window of recent tokens
    and emits what is new once it no longer ends in U+FFFD (as vLLM and TGI do). Text that could still become a
    stop string is held back until it cannot.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for the tokens being decoded
        self.read_offset = 0  # tokens up to here are already in `text`
        self.text = ""  # all decoded text so far
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to emit (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what was held back at the end of generation."""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for stop in self.stop:
            # A stop string may straddle the emitted boundary, so search from just before it.
            found = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if found >= 0:
                self.stopped = True
                self.text = self.text[:found]
                break
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._partial_stop_length()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
