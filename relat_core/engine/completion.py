"""What a legacy completion and a loglikelihood benchmark need of the engine (issue 27): a raw prompt (no chat
template), each prompt token's logprob (vLLM's prompt_logprobs, OpenAI's `echo` with `logprobs`), and
continuations scored as the answer, forced token by token after one training and one thought (lm-eval's
loglikelihood of each option, with relat's adapter trained once per question, not once per option).

The scheduler calls `check_request` and `scored_sampling`; the think phase `prompt_logprobs` where it reads a
prompt on the way to the answer; the Answerer reads `_Sequence.forced_tokens`.
"""

from __future__ import annotations

import dataclasses

import torch

from ..params import SAMPLING_BOUNDS, InvalidParameter, SamplingParams
from .context import EngineContext
from .events import Request, TokenLogprob

# The gates that read nothing but l0: the others read a draft of the answer, which a request that decodes no
# answer of its own (max_tokens 0, continuations) has not.
DRAFTLESS_GATES = ("none", "fidelity")


def check_request(request: Request, vocabulary: int) -> None:
    """Refuse what a raw prompt, prompt logprobs or continuations cannot be run with (InvalidParameter)."""
    ttt, sampling = request.ttt, request.sampling
    if (request.messages is None) == (request.prompt is None):
        raise InvalidParameter("prompt" if request.prompt is not None else "messages",
                               "a request has either messages or a raw prompt")
    if request.prompt is not None:
        prompt = request.prompt
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidParameter("prompt", "the prompt must not be empty")
        elif not (isinstance(prompt, list) and prompt
                  and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocabulary for t in prompt)):
            raise InvalidParameter("prompt", f"a prompt of token ids must be a non-empty list of ids below "
                                   f"{vocabulary}")
        if ttt.agents != "single":
            raise InvalidParameter("agents", "a raw prompt is answered by a single model (agents: single): agents "
                                   "take turns in a chat template")
        if ttt.answer_format not in ("auto", "text"):
            raise InvalidParameter("answer_format", "a raw prompt is read as it is: it takes no answer_format "
                                   "instruction (auto or text)")
    if sampling.prompt_logprobs is not None and ttt.agents != "single":
        raise InvalidParameter("prompt_logprobs", "prompt_logprobs needs a single model (agents: single): each "
                               "agent reads a prompt of its own")
    scored = request.continuations is not None
    if scored:
        continuations = request.continuations
        most = int(SAMPLING_BOUNDS["n"].high)
        if not (isinstance(continuations, list) and 0 < len(continuations) <= most
                and all(isinstance(c, str) and c for c in continuations)):
            raise InvalidParameter("continuations", f"continuations must be 1 to {most} non-empty strings")
        if ttt.agents != "single":
            raise InvalidParameter("continuations", "continuations are scored after a single model's thought "
                                   "(agents: single)")
    if (scored or sampling.max_tokens == 0) and ttt.trains and ttt.gate not in DRAFTLESS_GATES:
        raise InvalidParameter("gate", f"gate {ttt.gate} reads a draft of the answer, and this request decodes none "
                               f"(max_tokens 0, or continuations): use gate {' or '.join(DRAFTLESS_GATES)}")


def scored_sampling(sampling: SamplingParams, count: int) -> SamplingParams:
    """A request scoring `count` continuations decodes them as its n answers, each to its end: nothing stops one
    early (no end-of-sequence, no stop string), and each token's logprob is kept."""
    return dataclasses.replace(sampling, n=count, stop=(), ignore_eos=True, logprobs=True)


def prompt_logprobs(context: EngineContext, token_ids: list[int], hidden: torch.Tensor, top: int
                    ) -> list[TokenLogprob | None]:
    """Each prompt token's logprob under the distribution the position before it gives (None for the first, which
    nothing predicts), with the `top` likeliest tokens' there. hidden: (T, d), the final-norm hidden states of the
    forward that read the prompt's T tokens."""
    with torch.no_grad():
        log_probs = torch.log_softmax(context.lm_head(hidden[:-1]).float(), dim=-1)  # (T - 1, V)
        following = torch.tensor(token_ids[1:], device=log_probs.device)
        chosen = log_probs.gather(1, following[:, None])[:, 0].tolist()
        tops = log_probs.topk(top) if top else None
    decode = context.tokenizer.decode
    entries: list[TokenLogprob | None] = [None]
    for position, (token, value) in enumerate(zip(token_ids[1:], chosen, strict=True)):
        best: tuple[tuple[str, float], ...] = ()
        if tops is not None:
            best = tuple((decode([i]), v) for i, v in zip(tops.indices[position].tolist(),
                                                          tops.values[position].tolist(), strict=True))
        entries.append(TokenLogprob(token, decode([token]), value, best))
    return entries
