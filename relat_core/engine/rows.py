"""The engine's rows: plain dataclasses that the scheduler and the phases pass between them (vLLM v1's request
state), and the questions a row answers about its next work (`thinks`, `needs_score`, `answers_with_adapter`, ...).

A request is one `_Sequence` from admission to its result: it trains, thinks, then decodes as a row of the decoding
batch (`_Decoding`); a guided request brings a `_Plain` row along (arXiv 2511.16886), and a request asking for n
answers n - 1 copies of its row. A latent thought is a list of `Piece`s (LatentMAS, arXiv 2511.20639: one per
agent before the last), and a multi-agent request keeps its working memory between engine steps as a `_Memory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..agents import Role
from ..chat import Segments
from ..decoding import IncrementalDetokenizer
from ..grammar import RowGrammar
from ..latent import SequenceState
from ..lora import Binding
from ..models.huginn import RowRecurrence
from ..params import SamplingParams, TTTParams
from .events import AgentDone, Choice, Trace


@dataclass(frozen=True)
class Piece:
    """A part of a latent thought: prompt tokens (the question's from `question_start` on), then latent steps."""

    token_ids: list[int]
    question_start: int
    latent_steps: int


@dataclass(eq=False)
class _Draft:
    """A gated request's draft (relat_core/engine/gating.py): direct's answer decoded for its first `limit` tokens
    as a row of the decoding batch, with each token's confidence, its text held back until the gate decides."""

    limit: int
    generator_state: torch.Tensor  # the sampler before the draft: put back if the request trains
    start: float
    entropies: list[float] = field(default_factory=list)  # nats, of each draft token's distribution
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 probability
    logprobs: list[float] = field(default_factory=list)  # of the token chosen
    held: list = field(default_factory=list)  # the text events not yet emitted
    tokens: list[int] = field(default_factory=list)  # the draft, once settled
    settled: bool = False

    def record(self, logits: torch.Tensor, token: int) -> None:
        """One draft token's confidence, from the model's own distribution (temperature 1, whatever the sampler)."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        top = log_probs.topk(2).values.exp().tolist()
        probs = log_probs.exp()  # xlogy: a token a grammar masked out (probability 0) adds 0, not nan
        self.entropies.append(float(-torch.special.xlogy(probs, probs).sum()))
        self.margins.append(top[0] - top[1])
        self.logprobs.append(float(log_probs[token]))

    def statistics(self) -> dict[str, float]:
        """The draft's confidence signals: means over its tokens, and their probabilities' geometric mean."""
        count = max(len(self.logprobs), 1)
        mean_logprob = sum(self.logprobs) / count
        return {"draft_entropy": sum(self.entropies) / count, "draft_margin": sum(self.margins) / count,
                "draft_logprob": mean_logprob, "draft_confidence": math.exp(mean_logprob)}


@dataclass
class _Memory:
    """A request's latent working memory between its agents' engine steps: its KV cache (one row) and the last
    hidden state (1, d)."""

    state: SequenceState
    hidden: torch.Tensor


@dataclass(eq=False)
class _Sequence:
    """One request's life in the engine: training ("train"), the latent thought with the final weights ("think"),
    then decoding ("decode") as a row of the decoding batch.

    A multi-agent request (`team`) goes through "think" once per agent: latent agents add their turn and latent
    steps to the request's working memory (`memory`) one engine step each; a TextMAS agent is prefilled afresh
    and decodes its text as a row of the decoding batch, then the request thinks again for the next agent."""

    request_id: str
    segments: Segments
    ttt: TTTParams
    sampling: SamplingParams
    trace: Trace
    start: float
    slot: int | None = None  # the leased adapter slot (relat)
    return_adapter: bool = False  # copy the adapter into the result before the slot is released
    cache_key: str | None = None  # a miss's key: its adapter is cached once training ends
    cache_partition: str = ""  # Request.cache_partition: mixed into the cache's key
    phase: str = "think"
    step: int = 0  # training steps taken
    adapted: bool = False  # training ended with an adapter the answer may use
    loss_now: float | None = None  # the loss at the current weights, when it was measured last (an early stop)
    draft: list[int] | None = None  # objective "entropy": the base model's greedy draft, decoded at the first step
    gate_draft: _Draft | None = None  # a gated request's draft of direct's answer (gating.py)
    generator: torch.Generator | None = None
    depth: RowRecurrence | None = None  # how a recurrent-depth model iterates this request's positions
    answer_depths: list[int] = field(default_factory=list)  # recurrences of each answer position read back
    detokenizer: IncrementalDetokenizer | None = None
    grammar: RowGrammar | None = None  # a structured answer's place in its grammar, from when it joins the batch
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob of each token in `tokens`, when asked for
    unsent_logprobs: list = field(default_factory=list)  # those not yet carried by a TextDelta
    prompt_logprobs: list | None = None  # SamplingParams.prompt_logprobs: TokenLogprob per prompt token (completion.py)
    forced: list[list[int]] | None = None  # a request's continuations, scored as its answers (completion.py)
    decode_start: float = 0.0
    # -- multi-agent --
    messages: list[dict[str, str]] = field(default_factory=list)  # the request's, normalised
    team: tuple[Role, ...] = ()
    agent: int = 0  # the agent working now
    agent_pieces: list[Piece] = field(default_factory=list)  # latent agents: each turn before the last
    answer_prompt: Piece | None = None  # the last agent's turn (TextMAS: the current agent's, rebuilt each turn)
    piece: int = 0  # the thought's next piece in the think phase
    memory: _Memory | None = None
    reference: _Memory | None = None  # the memory's base-model twin (contrastive feedback)
    context: list[str] = field(default_factory=list)  # TextMAS: the earlier agents' labelled text
    prompt_tokens: int = 0  # every prompt token the answer's run read, for usage
    agent_tokens: int = 0  # tokens the agents before the last wrote
    # -- n > 1: the request's answers past the first are rows of their own (copies of this one, `choice` 1..n-1,
    # `leader` this one), decoded beside it from the same thought and adapter; the request ends with the last. --
    choice: int = 0
    leader: _Sequence | None = None  # of an answer past the first: the request's own row
    siblings: list[_Sequence] = field(default_factory=list)
    ended: dict[int, Choice] = field(default_factory=dict)  # the answers that have ended, by index

    @property
    def pieces(self) -> list[Piece]:
        """The latent thought: every agent's turn before the last, or the prompt and its L latent steps."""
        if self.team:
            return self.agent_pieces
        if not self.trace.latent_steps:
            return []
        return [Piece(self.segments.prompt_ids, self.segments.question_start, self.trace.latent_steps)]

    @property
    def follow_ids(self) -> list[int]:
        """What is read after the thought, before the answer: the last agent's turn, or the follow-up segment."""
        return self.answer_prompt.token_ids if self.team else self.segments.follow_ids

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt an answer from the prompt alone (and a guided request's plain row) is decoded after."""
        return self.answer_prompt.token_ids if self.team else self.segments.prompt_ids

    @property
    def forced_tokens(self) -> list[int] | None:
        """The tokens this answer is forced to (continuation `choice` of the request's), or None: it decodes."""
        return None if self.forced is None else self.forced[self.choice]

    @property
    def writes_agent_text(self) -> bool:
        """A TextMAS agent before the last is decoding: its text is for the agents after it, not the client."""
        return bool(self.team) and self.agent < len(self.team) - 1

    @property
    def thinks(self) -> bool:
        """A piece of the thought is still to run before the answer: every agent runs again after training; a
        single model thinks when the answer follows the thought or its loss is still to be measured."""
        if self.piece >= len(self.pieces) or self.drafting:
            return False
        return bool(self.team) or self.answers_after_thought or self.needs_score

    @property
    def drafting(self) -> bool:
        """The gate's draft of direct's answer is being decoded: prompt alone, no adapter, its text held back."""
        return self.gate_draft is not None and not self.gate_draft.settled

    def final_signals(self) -> None:
        """The signals known once the answer is: the loss drop l0 - l_N of training, and whether the adapted
        answer's first tokens agree with the gate's draft of direct's (trace.signals)."""
        trace = self.trace
        if trace.objective == "reconstruction" and trace.recon_loss_after is not None:
            trace.signals.setdefault("l0", trace.recon_loss_before)
            trace.signals["loss_drop"] = trace.recon_loss_before - trace.recon_loss_after
        draft = self.gate_draft
        if draft is not None and self.adapted:
            trace.signals["agreement"] = self.tokens[:len(draft.tokens)] == draft.tokens

    @property
    def needs_score(self) -> bool:
        """The reconstruction loss after training is still to be measured (it was not, at an early stop)."""
        return self.adapted and self.loss_now is None

    @property
    def answers_after_thought(self) -> bool:
        """The answer follows the latent thought; else it follows the prompt alone (relat, answer_context
        "question", and direct, whose thought is empty)."""
        return self.trace.answer_context == "thought"

    @property
    def answers_with_adapter(self) -> bool:
        # Answering from the question alone with the adapter off would be `direct`: that context implies it on.
        return self.adapted and (self.ttt.adapter_during_answer or not self.answers_after_thought)

    @property
    def answers_as_base(self) -> bool:
        """The answer is the base model's on the plain prompt, no thought before it and no adapter: direct, and a
        gated request's draft or kept answer."""
        return self.drafting or not (self.answers_with_adapter or self.answers_after_thought)

    @property
    def needs_plain_row(self) -> bool:
        """The one rule of which answers decode a `_Plain` row beside them: a guided answer (its logits mix the
        plain row's), and an answer asking for logprob_shift (its base logprobs are the plain row's), unless that
        answer is the base model's on the plain prompt already (its own logits are the base ones: shift 0)."""
        shift = self.ttt.logprob_shift and self.sampling.logprobs and not self.writes_agent_text
        return self.ttt.guided or (shift and not self.answers_as_base)


@dataclass(eq=False)
class _Plain:
    """The plain row of an answer in the decoding batch (`_Sequence.needs_plain_row`): the base model on the
    prompt alone, fed the tokens its owner chooses, so that a guided owner's tokens can be chosen from
    l_plain + w (l_own - l_plain), and an owner asking for logprob_shift gets each token's base logprob. It holds no
    slot and emits nothing; it leaves with its owner."""

    owner: _Sequence
    answers_with_adapter: bool = False


def _owner(row: _Sequence | _Plain) -> _Sequence:
    return row.owner if isinstance(row, _Plain) else row


@dataclass
class _Decoding:
    """The decoding batch: every decoding request is a row of one KV cache; `hidden` (B, d) gives each row's next
    token."""

    rows: list[_Sequence | _Plain]
    state: SequenceState
    hidden: torch.Tensor
    # The rows' answering adapters, gathered once and reused while the rows stay (their slots no longer train).
    binding: Binding | None = None
    stale: bool = True


def agent_done(row: _Sequence, turn: dict) -> tuple[str, AgentDone]:
    """Record an agent's finished turn in its request's trace; returns the event that says so."""
    row.trace.agent_turns.append(turn)
    return row.request_id, AgentDone(turn)
