"""Token logprobs on the wire: OpenAI's choices[].logprobs objects, and relat's extension of each entry.

The chat endpoint and the native one return the same objects (server/response_models.py's responses and stream events).
With `relat.logprob_shift`, each entry also carries `relat_base_logprob`, the token's logprob under the base model
on the plain prompt. The name is prefixed because the entry is OpenAI's object: a field OpenAI may add later cannot
collide with it, and a client that knows only OpenAI's fields reads past it.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from relat_core import TokenLogprob


def _none(value: object) -> bool:
    return value is None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobInfo(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]
    relat_base_logprob: float | None = Field(
        None, exclude_if=_none,
        description="with relat.logprob_shift: the token's logprob under the base model on the plain prompt (no "
                    "thought, no adapter, no guidance); logprob minus this is what the request's thought, adapter "
                    "and guidance changed")


class ChoiceLogprobs(BaseModel):
    """OpenAI's choices[].logprobs: one entry per answer token."""

    content: list[TokenLogprobInfo]


def choice_logprobs(entries: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    """The engine's TokenLogprob list in OpenAI's shape (None when not asked for); bytes are the token's text's
    UTF-8 (a token that is part of a character decodes to U+FFFD, whose bytes these are)."""
    if entries is None:
        return None
    return ChoiceLogprobs(content=[TokenLogprobInfo(
        token=entry.text, logprob=entry.logprob, bytes=list(entry.text.encode()),
        top_logprobs=[TopLogprob(token=text, logprob=value, bytes=list(text.encode())) for text, value in entry.top],
        relat_base_logprob=entry.base_logprob)
        for entry in entries])
