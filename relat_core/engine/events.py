"""What goes into the engine and what comes out of it: a request, the events a step emits, and a request's result.

The result follows OpenAI's chat completion (choices, finish_reason, usage), which the server returns as it is
(server/protocol.py); the trace is the engine's own record of how the answer was made (ReLAT, arXiv 2606.06252).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..export import AdapterExport
from ..params import SamplingParams, TTTParams


class EngineBusy(RuntimeError):
    """Every adapter slot is leased."""


@dataclass
class Request:
    # The chat messages, turned into the prompt by the model's chat template; or, exclusive of them, `prompt`: a
    # raw prompt (text, or token ids) read as it is, no template, the whole of it the question (a legacy completion).
    messages: list[dict] | None = None
    ttt: TTTParams = field(default_factory=TTTParams)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Keep the trained adapter: the result carries a copy in PEFT's format (relat_core/export.py). Not a TTT
    # parameter: it changes what the request returns, not how it runs.
    return_adapter: bool = False
    prompt: str | list[int] | None = None
    # Instead of decoding an answer: score each of these texts as the answer (forced, token by token, after the
    # request's one training and thought). choices[k] is continuation k, with its tokens' logprobs (lm-eval's
    # loglikelihood of a multiple-choice option, with relat's adapter trained once for all of them).
    continuations: list[str] | None = None
    # OpenAI's function tools, rendered into the prompt by the chat template (which must support them: Engine.check);
    # the reply's tool calls are the caller's to parse (server/tools.py), and a forced call is a structured output.
    tools: list[dict] | None = None
    # Which part of the adapter cache this request may take from and add to: an opaque string mixed into the cache's
    # key, so that requests in different partitions never share an adapter (a server makes it of the client's
    # tenant and cache salt). Not a TTT parameter: it changes nothing of the training.
    cache_partition: str = ""


@dataclass
class TrainStep:
    step: int  # 1-based
    steps: int
    loss: float
    grad_norm: float | None  # None when the step stopped training before a backward pass
    seconds: float


@dataclass(frozen=True)
class TokenLogprob:
    """An answer token's logprob (SamplingParams.logprobs) and the likeliest tokens' at its position: each as
    (text, logprob), the text that token decodes to alone. With TTTParams.logprob_shift, `base_logprob` is the
    token's logprob under the base model on the plain prompt (no thought, no adapter, no guidance); the shift
    logprob - base_logprob is what the request's thought, adapter and guidance changed."""

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    base_logprob: float | None = None


@dataclass
class TextDelta:
    text: str
    index: int = 0  # which answer, when a request asks for n > 1
    logprobs: list[TokenLogprob] | None = None  # the tokens this piece of text completes (logprobs asked for)


@dataclass
class AgentDone:
    """An agent before the last has finished its turn (multi-agent requests); `turn` is its trace entry."""

    turn: dict


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Trace:
    method: str
    latent_steps: int
    adapter_during_answer: bool
    answer_context: str = "thought"  # what the answer was decoded after: "thought", or "question" (prompt alone)
    guidance: float = 1.0  # w of the answer's logits l_plain + w (l_own - l_plain); 1: no plain row
    contrastive_eta: float = 0.0  # eta of the final thought's contrastive feedback; 0: off
    agents: str = "single"  # the team (relat_core/agents.py)
    answer_format: str = "text"  # the format the answer was asked for ("text": none)
    # Each agent of the final run, in order: role, label, kind ("text", "latent" or "answer"), prompt_tokens,
    # latent_positions, completion_tokens, seconds, and the text a TextMAS agent wrote (the answer is the result's).
    agent_turns: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # {step, loss, grad_norm, seconds}
    # The training objective whose loss `steps`, recon_loss_before and recon_loss_after hold ("reconstruction",
    # "prompt_lm" or "entropy": relat_core/engine/objectives.py); None when nothing trained.
    objective: str | None = None
    recon_loss_before: float | None = None
    recon_loss_after: float | None = None
    stopped_early: bool = False
    aborted: str | None = None  # why the update was abandoned and the base model answered
    # return_adapter: the exported adapter (rank, alpha, targets, bytes; a server adds where to fetch it); None when
    # not asked for, or when the update was abandoned (`aborted`: no adapter answered, and its weights were bad).
    adapter: dict | None = None
    # The adapter cache: "hit" (the adapter came from it; `steps` are those recorded when it was trained) or "miss"
    # (trained here); None when it was not consulted (nothing trained, the cache off, or the request's cache false).
    cache: str | None = None
    # Recurrent-depth models: the core-block recurrences of the answer's positions read back (every answer token
    # but the last), {"mean", "min", "max", "positions"}; None on other models or before a token was read back.
    recurrences: dict | None = None
    # The gate (relat_core/engine/gating.py): whether it kept direct's answer (None: no gate ran), its kind, signal,
    # value and threshold, and the signals measured: l0, the draft's entropy, margin, logprob and confidence, and
    # after training the loss drop and the draft's agreement with the adapted answer.
    gated: bool | None = None
    gate: dict | None = None
    signals: dict[str, float | bool] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    # Every TTT parameter the request ran with, defaults filled in: what a report needs to name a run in full.
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Choice:
    """One of a request's n answers."""

    index: int
    text: str
    finish_reason: str  # "stop" or "length"
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for


@dataclass
class Result:
    text: str  # the first answer's (choices[0]), for the many callers that ask for one
    finish_reason: str  # "stop" or "length"
    usage: Usage  # completion_tokens: of every answer (and of the agents before the last)
    trace: Trace
    token_ids: list[int]
    adapter: AdapterExport | None = None  # return_adapter: the trained adapter, copied off its slot
    choices: list[Choice] = field(default_factory=list)  # every answer, n of them
    # SamplingParams.prompt_logprobs: one per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_token_ids: list[int] = field(default_factory=list)  # the prompt the answer was read after


@dataclass
class Finished:
    result: Result


@dataclass
class Failed:
    """This request failed on its own (its sampling, its text, its batch row run alone); the others go on."""

    error: Exception


Event = TrainStep | AgentDone | TextDelta | Finished | Failed
