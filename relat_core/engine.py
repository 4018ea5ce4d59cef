"""The engine: `direct`, `latent` (open loop) and `relat` (closed loop), many requests batched together.

relat, per request (arXiv 2606.06252):
  1. a fresh LoRA slot (B = 0, so step 0 is the base model);
  2. N times: prefill the question, run L latent steps, rebuild the question from the latent thought alone
     (masked cross-entropy), backpropagate through the whole rollout into the slot, one clipped AdamW step;
  3. with the adapted weights, prefill and think again (contrastive feedback against the base model optional),
     then decode the answer after the follow-up segment, with the adapter on or off; or (answer_context
     "question") decode it from the prompt alone through the adapter. Guided decoding mixes each token's logits
     with those of a plain row, the base model on the prompt, decoded in lockstep;
  4. the slot is released; the base weights are never touched (they have no gradient and no optimiser).
Multi-agent requests (relat_core/agents.py) run their agents as the same phases: a latent agent's turn and latent
steps are one think step on the request's working memory, kept between engine steps; a TextMAS agent is a
decoding row whose text feeds the next agent's prompt; relat trains through every agent's turn at once (the
gradient must cross them all), then runs the agents again with the adapter, one per engine step.
Requests run together as the rows of one batch (continuous batching, as vLLM does for decoding): the requests
still training share one forward and backward pass per step, each row through its own adapter slot, and the
requests answering share one forward pass per token. `add_request` / `step` / `abort_request` drive it;
`generate` runs one request alone as a stream of TrainStep, TextDelta and Finished events.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch

from .adapter_cache import AdapterCache, CachedAdapter, training_key
from .agents import TEAMS, AgentPrompts, Role, labelled, resolve_answer_format, with_format
from .chat import ChatFormat, Segments, normalise_messages
from .decoding import IncrementalDetokenizer, sample
from .export import AdapterExport, export_adapter
from .latent import LatentMap, SequenceState, Truncation, extend, latent_rollout, reconstruction_loss
from .loading import LoadedModel
from .lora import Binding, SlotBank
from .models.huginn import DEFAULT_EXIT_THRESHOLDS, HuginnForCausalLM, Recurrence, RowRecurrence
from .params import ALL_TARGETS, HUGINN_ATTENTION_TARGETS, InvalidParameter, SamplingParams, TTTParams

log = logging.getLogger("relat_core")

DEFAULT_ADAPTER_SEED = 0  # adapters are drawn from the request's seed, else this: same request, same answer


def _out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError other allocators (CPU, MPS) raise when memory runs out."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError)
                                                           and "out of memory" in str(error).lower())


class EngineBusy(RuntimeError):
    """Every adapter slot is leased."""


@dataclass
class Request:
    messages: list[dict]
    ttt: TTTParams = field(default_factory=TTTParams)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Keep the trained adapter: the result carries a copy in PEFT's format (relat_core/export.py). Not a TTT
    # parameter: it changes what the request returns, not how it runs.
    return_adapter: bool = False


@dataclass
class TrainStep:
    step: int  # 1-based
    steps: int
    loss: float
    grad_norm: float | None  # None when the step stopped training before a backward pass
    seconds: float


@dataclass
class TextDelta:
    text: str
    index: int = 0  # which answer, when a request asks for n > 1


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


@dataclass
class Result:
    text: str  # the first answer's (choices[0]), for the many callers that ask for one
    finish_reason: str  # "stop" or "length"
    usage: Usage  # completion_tokens: of every answer (and of the agents before the last)
    trace: Trace
    token_ids: list[int]
    adapter: AdapterExport | None = None  # return_adapter: the trained adapter, copied off its slot
    choices: list[Choice] = field(default_factory=list)  # every answer, n of them


@dataclass
class Finished:
    result: Result




@dataclass
class Failed:
    """This request failed on its own (its sampling, its text, its batch row run alone); the others go on."""

    error: Exception


Event = TrainStep | AgentDone | TextDelta | Finished | Failed


@dataclass(frozen=True)
class Piece:
    """A part of a latent thought: prompt tokens (the question's from `question_start` on), then latent steps."""

    token_ids: list[int]
    question_start: int
    latent_steps: int


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
    phase: str = "think"
    step: int = 0  # training steps taken
    adapted: bool = False  # training ended with an adapter the answer may use
    loss_now: float | None = None  # the loss at the current weights, when it was measured last (an early stop)
    generator: torch.Generator | None = None
    depth: RowRecurrence | None = None  # how a recurrent-depth model iterates this request's positions
    answer_depths: list[int] = field(default_factory=list)  # recurrences of each answer position read back
    detokenizer: IncrementalDetokenizer | None = None
    tokens: list[int] = field(default_factory=list)
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
    def writes_agent_text(self) -> bool:
        """A TextMAS agent before the last is decoding: its text is for the agents after it, not the client."""
        return bool(self.team) and self.agent < len(self.team) - 1

    @property
    def thinks(self) -> bool:
        """A piece of the thought is still to run before the answer: every agent runs again after training; a
        single model thinks when the answer follows the thought or its loss is still to be measured."""
        if self.piece >= len(self.pieces):
            return False
        return bool(self.team) or self.answers_after_thought or self.needs_score

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


@dataclass(eq=False)
class _Plain:
    """The plain row of a guided request in the decoding batch: the base model on the prompt alone, fed the
    tokens its owner chooses, so that each of the owner's tokens can be chosen from l_plain + w (l_own - l_plain).
    It holds no slot and emits nothing; it leaves with its owner."""

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


def default_ttt_params(num_parameters: int) -> TTTParams:
    """The engine's default for a model of this size (bench/RESULTS.md, sections 3 and 7).

    Below 1B parameters: measured on SmolLM2-135M. L=4, N=2 and lr 5e-3 come from the first search; the second
    (issue 9), chosen on the search half of 319 knowledge questions and reported on the other half, answers from
    the question alone with the adapted model (answer_context "question"): this model reads its own latent thought
    badly (latent trails direct), and the thought then serves only to train the adapter.
    From 1B on, unmeasured here (no GPU, no large weights): the paper's published L=16 and N=5 (rank 8 is common
    to both); of the choices the paper leaves open, the answer follows the thought, the adapter stays off while
    answering (an adapter trained to rebuild the question pulls answers toward repeating it, whatever the size),
    and the bridge replaces the restatement, which made up for a small model that reads its own latents badly.
    """
    if num_parameters < 1_000_000_000:
        return TTTParams(answer_context="question")
    return TTTParams(latent_steps=16, steps=5, follow_up="bridge")


def recurrence_defaults(model: HuginnForCausalLM) -> dict[str, object]:
    """A recurrent-depth model's own defaults for the options a request leaves None: its config's mean depth and
    truncation, Huginn's initial-state scale, no adaptive exit."""
    config = model.config
    return {"num_steps": config.mean_recurrence, "init_scale": 1.0, "exit_criterion": "none",
            "backprop_depth": config.mean_backprop_depth}


class Engine:
    """Runs many requests as one batch: `add_request`, then `step` until they finish (continuous batching).

    Each `step` advances every request by one unit of work: one batched training step for the requests still
    training, the latent thought of those that just finished training (or need none), and one decoding step for
    every request that is answering. Requests join between steps and leave as they finish or are aborted; each
    gets the losses and answer it would get alone (tests/test_batching.py). Not thread-safe: one thread owns it.
    """

    def __init__(self, loaded: LoadedModel, max_rank: int = 64, num_slots: int = 1,
                 defaults: TTTParams | None = None, decode_share: float = 0.8,
                 agent_prompts: AgentPrompts | None = None, adapter_cache: AdapterCache | None = None):
        if not 0 <= decode_share < 1:
            raise ValueError("decode_share must be in [0, 1)")
        # While some requests train and others answer: the share of the engine's time that goes to answering
        # (0: one token per training step). A batched training step costs as much as tens of tokens: one token
        # per step would stretch an answer over minutes while others train, and the requests answering would pile
        # up and leave the training batch small (bench/RESULTS.md, section 6: 0.5 halved throughput through HTTP).
        self.decode_share = decode_share
        self._decode_credit = 0.0  # seconds of answering owed since the last training step
        self.model = loaded.model
        # A recurrent-depth model (Huginn) runs each row at its request's depth: rows carry a RowRecurrence, bound
        # around every forward as the adapter slots are.
        self.recurrent = isinstance(self.model, HuginnForCausalLM)
        self.family = "huginn" if self.recurrent else str(getattr(self.model.config, "model_type", "unknown"))
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        # What an exported adapter names as its base: the folder or hub id the weights came from, else the name.
        self.base_model_name = getattr(self.model.config, "_name_or_path", "") or loaded.name
        self.device = self.model.device
        self.chat = ChatFormat(self.tokenizer)
        self.latent_map = LatentMap(self.model)  # realignment solved once, not per request
        self.lm_head = self.model.get_output_embeddings()
        self.bank = SlotBank(self.model, num_slots=num_slots, max_rank=max_rank, targets=ALL_TARGETS)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        if defaults is None:
            defaults = default_ttt_params(self.num_parameters)
            if self.recurrent:
                defaults = defaults.replace(targets=HUGINN_ATTENTION_TARGETS, **recurrence_defaults(self.model))
        self.defaults = defaults
        self.stop_ids = self._stop_token_ids()
        self.agent_prompts = agent_prompts or AgentPrompts()
        # Off unless given one (an empty cache is falsy: it has a length).
        self.adapter_cache = adapter_cache if adapter_cache is not None else AdapterCache(max_entries=0, max_bytes=0)
        self._sequences: dict[str, _Sequence] = {}  # in arrival order
        self._decoding: _Decoding | None = None

    def _stop_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        generation_config = getattr(self.model, "generation_config", None)  # relat_core's own models have none
        configured = generation_config.eos_token_id if generation_config is not None else None
        ids.update(configured if isinstance(configured, list) else [configured])
        for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return {i for i in ids if i is not None}

    # -- public ---------------------------------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        return self.bank.num_slots - len(self.bank.free)

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._sequences)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._sequences)

    def check(self, request: Request) -> list[dict[str, str]]:
        """Refuse what this engine cannot run (InvalidParameter); returns the normalised messages.

        Cheap and thread-safe (no tokenizer, no tensors), so a server can call it before queueing a request.
        """
        messages = normalise_messages(request.messages)
        ttt = request.ttt
        if not self.recurrent and ttt.recurrence_options:
            name = next(iter(ttt.recurrence_options))
            raise InvalidParameter(name, f"{name} applies to recurrent-depth models (Huginn) only; {self.name} is not "
                                   "one")
        if ttt.trains and not set(ttt.targets) <= self.bank.kinds:
            missing = ", ".join(t for t in ttt.targets if t not in self.bank.kinds)
            raise InvalidParameter("targets", f"{self.name} has no layers named {missing}; its targets are "
                                   f"{', '.join(sorted(self.bank.kinds))}")
        if ttt.trains and ttt.rank > self.bank.max_rank:
            raise InvalidParameter("rank", f"rank must be at most {self.bank.max_rank} on this server")
        if request.return_adapter and not ttt.trains:
            raise InvalidParameter("return_adapter", "return_adapter needs an adapter to return: method relat with "
                                   f"steps >= 1, got method {ttt.method} with steps {ttt.steps}")
        return messages

    def add_request(self, request_id: str, request: Request) -> None:
        """Admit a request; it starts with the next `step`. Raises InvalidParameter, or EngineBusy when a `relat`
        request finds every adapter slot leased."""
        if request_id in self._sequences:
            raise ValueError(f"request {request_id!r} is already in the engine")
        messages = self.check(request)
        ttt, sampling = self._resolved(request.ttt), request.sampling
        team = TEAMS.get(ttt.agents, ())
        question = messages[-1]["content"]
        answer_format = resolve_answer_format(ttt, question)
        if not team and answer_format != "text":
            messages[-1] = {"role": "user", "content": with_format(question, answer_format, self.agent_prompts)}
        # Latent agents always share a working memory (of their turns alone when latent_steps is 0).
        thinks = ttt.method != "direct" and (ttt.latent_steps > 0 or bool(team))
        segments = self.chat.segments(messages, ttt.reconstruction_instruction, ttt.follow_up, latent=thinks)
        # Each option as it applies to this request (the trace reports what ran, not what was asked).
        from_thought = thinks and not (ttt.method == "relat" and ttt.answer_context == "question")
        trace = Trace(ttt.method, ttt.latent_steps if thinks else 0, adapter_during_answer=False,
                      answer_context="thought" if from_thought else "question",
                      guidance=ttt.guidance if ttt.guided else 1.0,
                      contrastive_eta=ttt.contrastive_eta if ttt.trains else 0.0,
                      agents=ttt.agents, answer_format=answer_format,
                      options={**asdict(ttt), "targets": list(ttt.targets)})
        sequence = _Sequence(request_id, segments, ttt, sampling, trace, time.perf_counter(),
                             return_adapter=request.return_adapter, messages=messages, team=team)
        if self.recurrent:
            sequence.depth = RowRecurrence(ttt.num_steps, ttt.init_scale, ttt.exit_criterion, ttt.exit_threshold,
                                           ttt.backprop_depth, DEFAULT_ADAPTER_SEED if sampling.seed is None
                                           else sampling.seed)
        sequence.generator = torch.Generator()  # one per request: its agents and its answer draw from it in turn
        if sampling.seed is not None:
            sequence.generator.manual_seed(sampling.seed)
        else:
            sequence.generator.seed()
        if team:
            if thinks:
                sequence.agent_pieces = [self._agent_turn(sequence, role, ttt.latent_steps) for role in team[:-1]]
            sequence.answer_prompt = self._agent_turn(sequence, team[-1] if thinks else team[0], 0)
        if ttt.trains:
            slot = self.bank.acquire()
            if slot is None:
                raise EngineBusy("no free adapter slot")
            seed = sampling.seed if sampling.seed is not None else DEFAULT_ADAPTER_SEED
            key = self._training_key(sequence, seed) if ttt.cache and self.adapter_cache.enabled else None
            cached = self.adapter_cache.get(key) if key is not None else None
            try:
                if cached is None:
                    self.bank.reset(slot, ttt.rank, ttt.targets, torch.Generator(self.device).manual_seed(seed))
                else:
                    self.bank.load(slot, cached.weights)
            except BaseException:
                self.bank.release(slot)  # the request never joined: nothing else would give its slot back
                raise
            sequence.slot, sequence.phase = slot, "train"
            if key is not None:
                sequence.trace.cache = "miss" if cached is None else "hit"
            if cached is None:
                sequence.cache_key = key
            else:
                self._trained_from_cache(sequence, cached)
        self._sequences[request_id] = sequence

    def _resolved(self, ttt: TTTParams) -> TTTParams:
        """A recurrent-depth model's options with the model's defaults where the request left them None (and the
        exit criterion's default threshold), so that the trace and the adapter cache's key name what ran."""
        if not self.recurrent:
            return ttt
        fill = {name: value for name, value in recurrence_defaults(self.model).items() if getattr(ttt, name) is None}
        ttt = ttt.replace(**fill) if fill else ttt
        if ttt.exit_criterion != "none" and ttt.exit_threshold is None:
            ttt = ttt.replace(exit_threshold=float(DEFAULT_EXIT_THRESHOLDS[ttt.exit_criterion]))
        return ttt

    def _training_key(self, sequence: _Sequence, seed: int) -> str:
        """The adapter cache's key: what the training of this request reads, and how it trains."""
        pieces = [(piece.token_ids, piece.question_start, piece.latent_steps) for piece in sequence.pieces]
        segments = sequence.segments
        return training_key(self.name, pieces, segments.recon_ids, segments.recon_labels, sequence.ttt, seed)

    def _trained_from_cache(self, sequence: _Sequence, cached: CachedAdapter) -> None:
        """A hit: the request skips training, its trace holding what the adapter's own training recorded."""
        sequence.step = cached.steps_taken
        sequence.trace.steps = cached.records()
        sequence.trace.recon_loss_before = cached.recon_loss_before
        sequence.trace.stopped_early = cached.stopped_early
        sequence.loss_now = cached.loss_now
        self._end_training(sequence, adapted=True)

    def _agent_turn(self, sequence: _Sequence, role: Role, latent_steps: int) -> Piece:
        """An agent's prompt: the request's messages with its last user turn replaced by the agent's, holding the
        earlier agents' text where the agent reads it (TextMAS) and the answer format for the last agent."""
        messages = sequence.messages
        question = sequence.segments.question
        context = "\n\n".join(sequence.context) if role.reads_context else ""
        answer_format = sequence.trace.answer_format if role == sequence.team[-1] else "text"
        turn = self.agent_prompts.turn(role, question, context, answer_format)
        token_ids, question_start = self.chat.prompt(messages[:-1] + [{"role": "user", "content": turn}], question)
        return Piece(token_ids, question_start, latent_steps)

    def abort_request(self, request_id: str) -> None:
        """Drop a request between steps (cancelled, past its deadline); its slot is free for the next one at once.
        Unknown or finished ids are ignored."""
        sequence = self._sequences.pop(request_id, None)
        if sequence is None:
            return
        if sequence.slot is not None:
            self.bank.release(sequence.slot)
        if sequence.phase == "decode":
            self._leave_decoding([sequence, *sequence.siblings])

    def step(self) -> list[tuple[str, Event]]:
        """One unit of work: a training step of every request still training, unless the answering requests still
        have time owed from the last one (`decode_share`); one agent (or the whole thought) of every thinking
        request; then one token of every answering request. Returns
        the events produced, in order; one token per step keeps the answers streaming token by token."""
        events: list[tuple[str, Event]] = []
        training = [s for s in self._sequences.values() if s.phase == "train"]
        if training and (self._decoding is None or self._decode_credit <= 0):
            start = time.perf_counter()
            events += self._isolated(training, self._train_step)
            self._decode_credit = (time.perf_counter() - start) * self.decode_share / (1 - self.decode_share)
        thinking = [s for s in self._sequences.values() if s.phase == "think"]
        if thinking:
            events += self._isolated(thinking, self._start_decoding)
        if self._decoding is not None:
            start = time.perf_counter()
            events += self._decode_step()
            self._decode_credit -= time.perf_counter() - start
        if self._decoding is None:
            self._decode_credit = 0.0  # credit is for the answers running now, not for later ones
        return events

    def generate(self, request: Request) -> Iterator[Event]:
        """One request alone, as an event stream (check it now; close the stream to cancel it, which frees its
        adapter slot at once). A request's failure is raised from the stream."""
        self.check(request)
        return self._generate(request)

    def _generate(self, request: Request) -> Iterator[Event]:
        if self._sequences:
            raise EngineBusy("generate runs a request alone; batch requests with add_request and step")
        request_id = "generate"
        self.add_request(request_id, request)
        try:
            while request_id in self._sequences:
                for _, event in self.step():
                    if isinstance(event, Failed):
                        raise event.error
                    yield event
        finally:
            self.abort_request(request_id)

    def run(self, request: Request) -> Result:
        """Run a request to the end and return its result."""
        for event in self.generate(request):
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("generate ended without a result")

    # -- scheduling -----------------------------------------------------------------------------------------

    def _isolated(self, rows: list[_Sequence], phase: Callable[[list[_Sequence]], list[tuple[str, Event]]]
                  ) -> list[tuple[str, Event]]:
        """Run a phase over its rows as one batch; if the batch fails, run it again in halves, down to one row, so
        that only a row that fails alone fails: a batch too large for the memory left finishes as smaller ones,
        and a row whose own work raises fails without the others (the training and thinking phases change nothing
        until they succeed)."""
        try:
            return phase(rows)
        except Exception as error:
            failure = error
        # Out of the except block, so that the failed batch's tensors (held by the traceback's frames) can go.
        self._release_memory(failure)
        if len(rows) == 1:
            return [self._fail(rows[0], failure)]
        log.warning("a batch of %d failed (%r); running it again in halves", len(rows), failure)
        middle = len(rows) // 2
        return self._isolated(rows[:middle], phase) + self._isolated(rows[middle:], phase)

    def _release_memory(self, error: Exception) -> None:
        """After an out-of-memory error on CUDA: hand the allocator's cached blocks back, so that the smaller
        batches that follow are not refused by a heap fragmented by the failed one."""
        if _out_of_memory(error) and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail(self, sequence: _Sequence, error: Exception) -> tuple[str, Event]:
        """End one request with its error; the others go on."""
        log.error("request %s failed: %r", sequence.request_id, error)
        self.abort_request(sequence.request_id)
        return sequence.request_id, Failed(error)

    def _binding(self, rows: list[_Sequence], on: list[bool]) -> Binding | None:
        """Batch row i through its request's adapter where on[i], else through none; None when no row uses one."""
        if not any(on):
            return None
        pairs = list(zip(rows, on, strict=True))
        adapted = [row for row, use in pairs if use]
        return self.bank.binding_for([row.slot if use else 0 for row, use in pairs],
                                     [row.ttt.alpha / row.ttt.rank if use else 0.0 for row, use in pairs],
                                     {kind for row in adapted for kind in row.ttt.targets},
                                     max(row.ttt.rank for row in adapted))

    def _bind(self, rows: list[_Sequence | _Plain], on: list[bool]):
        """The forwards inside run each row through its adapter where on[i] (one binding, gathered once)."""
        return self._bound(rows, self._binding(rows, on))

    @contextmanager
    def _bound(self, rows: list[_Sequence | _Plain], binding: Binding | None) -> Iterator[Recurrence | None]:
        """The forwards inside run row i through `binding` and, on a recurrent-depth model, at its request's depth;
        yields that Recurrence, which receives the recurrences each position ran (None on other models)."""
        # Exits apply where the forwards are bound without gradient: not in a training step, whose forwards all run
        # at full depth, those of its thought's graph-free first latent steps too.
        recurrence = Recurrence([_owner(row).depth for row in rows], exits=not torch.is_grad_enabled()) \
            if self.recurrent else None
        with self.bank.bound(binding), self.model.recurring(recurrence) if self.recurrent else nullcontext():
            yield recurrence

    # -- phases ---------------------------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]]) -> tuple[SequenceState, torch.Tensor]:
        """Prefill prompts as one left-padded batch; returns the state and each row's last hidden state, (B, d)."""
        state = SequenceState.empty(self.model, len(prompts), self.device)
        hidden = self._read_pieces(state, self._no_hidden(len(prompts)),
                                   [[Piece(ids, len(ids), 0)] for ids in prompts], [TTTParams()] * len(prompts))
        return state, hidden

    def _no_hidden(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.model.config.hidden_size, dtype=self.model.dtype, device=self.device)

    def _read_pieces(self, state: SequenceState, hidden: torch.Tensor, pieces: list[list[Piece]],
                     params: list[TTTParams], contrast: list[tuple[int, int]] = ()) -> torch.Tensor:
        """Append each row's pieces to `state`: its tokens (left-padded to a common width, the question's marked),
        then its latent steps; returns each row's last hidden state, (B, d). Rows with fewer pieces, shorter
        prompts or shorter thoughts get padding positions, invisible to all, so each row gets what it would alone.
        contrast: (row, reference) pairs of contrastive feedback (latent_rollout); a reference is a row too.
        In training, rows with backprop_latent_steps are truncated over their whole thought (latent.Truncation)."""
        truncation = Truncation.of(params, [sum(piece.latent_steps for piece in row) for row in pieces])
        for k in range(max((len(row) for row in pieces), default=0)):
            now = [row[k] if k < len(row) else None for row in pieces]
            width = max(len(piece.token_ids) if piece else 0 for piece in now)
            if width:
                token_ids = torch.full((len(now), width), self.tokenizer.pad_token_id, device=self.device)
                valid = torch.zeros(len(now), width, dtype=torch.bool, device=self.device)
                question = torch.zeros_like(valid)
                for index, piece in enumerate(now):
                    if piece and piece.token_ids:
                        first = width - len(piece.token_ids)
                        token_ids[index, first:] = torch.tensor(piece.token_ids, device=self.device)
                        valid[index, first:] = True
                        question[index, first + piece.question_start:] = True
                reading = [index for index, piece in enumerate(now) if piece and piece.token_ids]
                if truncation is not None:
                    hidden = truncation.sever(state, hidden)
                with truncation.forward(reading) if truncation is not None else nullcontext():
                    read = extend(self.model, state, input_ids=token_ids, valid=valid, question=question)[:, -1]
                hidden = torch.where(valid[:, -1:], read, hidden)
            hidden = latent_rollout(self.model, state, hidden, [piece.latent_steps if piece else 0 for piece in now],
                                    self.latent_map, params, contrast, truncation)
        return hidden

    def _think(self, rows: list[_Sequence]) -> tuple[SequenceState, torch.Tensor]:
        """Each row's whole latent thought from an empty cache (its prompt and latent steps, or every agent's turn
        and latent steps, in one pass: training backpropagates through all of it); returns the state and the last
        hidden state of each row, (B, d)."""
        state = SequenceState.empty(self.model, len(rows), self.device)
        hidden = self._read_pieces(state, self._no_hidden(len(rows)), [row.pieces for row in rows],
                                   [row.ttt for row in rows])
        return state, hidden

    def _reconstruction(self, rows: list[_Sequence], state: SequenceState, scored: list[bool] | None = None
                        ) -> torch.Tensor:
        """Per-row reconstruction loss (B,): the question's tokens after the latent thought, with every prompt's
        question hidden (`state.question`). Rows not `scored` take no part (all padding; their loss is 0)."""
        scored = scored or [True] * len(rows)
        segments = [row.segments for row in rows]
        batch = len(segments)
        length = max(len(s.recon_ids) for s, use in zip(segments, scored, strict=True) if use)
        recon_ids = torch.full((batch, length), self.tokenizer.pad_token_id, device=self.device)
        labels = torch.full((batch, length), -100, device=self.device)
        valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        for index, (s, use) in enumerate(zip(segments, scored, strict=True)):
            if use:
                recon_ids[index, :len(s.recon_ids)] = torch.tensor(s.recon_ids, device=self.device)
                labels[index, :len(s.recon_labels)] = torch.tensor(s.recon_labels, device=self.device)
                valid[index, :len(s.recon_ids)] = True
        return reconstruction_loss(self.model, state, recon_ids, valid, labels)

    def _train_step(self, rows: list[_Sequence]) -> list[tuple[str, Event]]:
        """One training step of every row as one batched forward and backward pass; each row's loss reaches only
        its own slot, so its update is exactly the one it would get alone. Rows that stop or fail leave training.
        Nothing about a row changes until the whole step has succeeded (a failed batch is re-run row by row)."""
        start = time.perf_counter()
        optimizer = self.bank.optimizer
        self.bank.zero_grad()
        try:
            with self._bind(rows, [True] * len(rows)):
                state, _ = self._think(rows)
                losses = self._reconstruction(rows, state)
            values = losses.tolist()
            stepping = [i for i, (row, value) in enumerate(zip(rows, values, strict=True))
                        if math.isfinite(value) and (row.ttt.stop_loss is None or value > row.ttt.stop_loss)]
            norms: list[float | None] = [None] * len(rows)
            if stepping:
                losses[stepping].sum().backward()
                del state, losses  # frees the graph's activations before the optimiser allocates
                slots = torch.tensor([rows[i].slot for i in stepping], device=self.device)
                slot_norms = optimizer.grad_norms(slots)
                finite = torch.isfinite(slot_norms)
                if bool(finite.any()):
                    def column(name: str) -> torch.Tensor:
                        return torch.tensor([getattr(rows[i].ttt, name) for i in stepping], device=self.device)[finite]

                    optimizer.step(slots[finite], column("lr"), column("weight_decay"), column("max_grad_norm"),
                                   slot_norms[finite])
                for i, norm in zip(stepping, slot_norms.tolist(), strict=True):
                    norms[i] = norm
        finally:
            self.bank.zero_grad()
        seconds = time.perf_counter() - start
        events: list[tuple[str, Event]] = []
        for row, value, norm in zip(rows, values, norms, strict=True):
            row.step += 1
            if row.step == 1:
                row.trace.recon_loss_before = value
            if not math.isfinite(value):
                self._abort_update(row, f"non-finite reconstruction loss at step {row.step}")
            elif norm is None:  # at or below stop_loss: the current weights are final
                row.trace.stopped_early = True
                row.loss_now = value
                events.append(self._record(row, value, None, seconds))
                self._end_training(row, adapted=True)
            elif not math.isfinite(norm):
                self._abort_update(row, f"non-finite gradient at step {row.step}")
            else:
                events.append(self._record(row, value, norm, seconds))
                if row.step >= row.ttt.steps:
                    self._end_training(row, adapted=True)
        return events

    @staticmethod
    def _record(row: _Sequence, loss: float, grad_norm: float | None, seconds: float) -> tuple[str, TrainStep]:
        row.trace.steps.append({"step": row.step, "loss": loss, "grad_norm": grad_norm, "seconds": seconds})
        return row.request_id, TrainStep(row.step, row.ttt.steps, loss, grad_norm, seconds)

    def _abort_update(self, row: _Sequence, reason: str) -> None:
        """Abandon the update: the slot is not bound again, so the base model answers; the trace says why."""
        row.trace.aborted = reason
        self._end_training(row, adapted=False)

    def _end_training(self, row: _Sequence, adapted: bool) -> None:
        """Training is over: with `adapted`, the slot holds the final weights, which a miss now caches."""
        if adapted and row.cache_key is not None:
            self.adapter_cache.put(row.cache_key, CachedAdapter(
                self.bank.snapshot(row.slot, row.ttt.rank, row.ttt.targets), row.trace.steps, row.step,
                row.trace.recon_loss_before, row.trace.stopped_early, row.loss_now))
        row.cache_key = None
        row.adapted = adapted
        row.trace.adapter_during_answer = row.answers_with_adapter
        row.phase = "think"

    def _start_decoding(self, rows: list[_Sequence]) -> list[tuple[str, Event]]:
        """The think phase: run each row's next piece of thought with the final weights (its own adapter or none).
        A row whose thought goes on (an agent before the last; latent, relat) keeps its working memory for the
        next engine step. A row whose thought is complete has its reconstruction scored (adapted rows), reads the
        follow-up (or its last agent's turn) and joins the decoding batch (the first token comes in this same
        engine step).

        Rows that answer from the prompt alone (direct and TextMAS agents; relat with answer_context "question")
        are prefilled afresh, each with its adapter on or off, and so are the plain rows of guided requests
        (adapter off). Nothing about a row changes until the whole phase has succeeded."""
        start = time.perf_counter()
        thinking = [row for row in rows if row.thinks]
        prompt_alone = [row for row in rows if not row.thinks]
        waiting: list[tuple[_Sequence, _Memory, _Memory | None]] = []  # rows whose next agent runs next step
        answering: list[_Sequence | _Plain] = []  # the decoding rows, in the order of `parts`
        parts: list[tuple[SequenceState, torch.Tensor]] = []
        losses: dict[int, float] = {}  # by id of the row
        with torch.no_grad():
            if thinking:
                state, hidden, references = self._thought(thinking)
                goes_on = [row.piece + 1 < len(row.pieces) for row in thinking]
                if any(goes_on):
                    memories = [_Memory(part, hidden[i:i + 1]) for i, part in enumerate(state.split(self.model))]
                    twins = {i: _Memory(part, references[1][k:k + 1])
                             for k, (i, part) in enumerate(zip(references[2], references[0].split(self.model),
                                                                strict=True))} if references else {}
                    waiting = [(row, memories[i], twins.get(i)) for i, row in enumerate(thinking) if goes_on[i]]
                    done = [i for i, on in enumerate(goes_on) if not on]
                    state = SequenceState.concatenate(self.model, [memories[i].state for i in done]) if done else None
                    hidden = hidden[done]
                    thinking = [thinking[i] for i in done]
                if thinking:
                    scored = [row.needs_score for row in thinking]
                    if any(scored):
                        length, position = state.length, state.next_position
                        with self._bind(thinking, [row.adapted for row in thinking]):
                            values = self._reconstruction(thinking, state, scored).tolist()
                        state.truncate(length, position)
                        losses = {id(row): value for row, value, use in zip(thinking, values, scored, strict=True)
                                  if use}
                    keep = [i for i, row in enumerate(thinking) if row.answers_after_thought]
                    if len(keep) < len(thinking) and keep:
                        state.select(torch.tensor(keep, device=self.device))
                        hidden = hidden[keep]
                    if keep:
                        after = [thinking[i] for i in keep]
                        parts.append((state, self._read_follow_up(after, state, hidden)))
                        answering += after
                    prompt_alone += [row for row in thinking if not row.answers_after_thought]
            starting = prompt_alone + [row for row in thinking if row.answers_after_thought]
            plain: list[_Sequence | _Plain] = list(prompt_alone)
            plain += [_Plain(row) for row in starting if row.ttt.guided]
            if plain:
                with self._bind(plain, [row.answers_with_adapter for row in plain]):
                    parts.append(self._prefill([_owner(row).prompt_ids for row in plain]))
                answering += plain
        # The phase has succeeded: from here on, the rows change.
        now = time.perf_counter()
        events: list[tuple[str, Event]] = []
        for row in rows:
            row.trace.timings.setdefault("train_s", start - row.start)
            row.trace.timings["think_s"] = row.trace.timings.get("think_s", 0.0) + now - start
        for row, memory, reference in waiting:
            row.memory, row.reference = memory, reference
            events.append(self._agent_done(row, self._latent_turn(row, now - start)))
        for row in {id(row): row for row in answering if isinstance(row, _Sequence)}.values():
            if id(row) in losses:
                row.trace.recon_loss_after = losses[id(row)]
            elif row.adapted:
                row.trace.recon_loss_after = row.loss_now
            if row.team and row.pieces and row.piece < len(row.pieces):  # the last latent agent's turn
                events.append(self._agent_done(row, self._latent_turn(row, now - start)))
            row.memory = row.reference = None
            row.prompt_tokens += len(row.follow_ids if row.answers_after_thought and row.team else row.prompt_ids)
            row.detokenizer = IncrementalDetokenizer(self.tokenizer, () if row.writes_agent_text
                                                     else row.sampling.stop)
            row.decode_start, row.phase = now, "decode"
        if answering:
            state = parts[0][0] if len(parts) == 1 else SequenceState.concatenate(self.model, [p[0] for p in parts])
            answering, state, hidden = self._with_answers(answering, state, torch.cat([p[1] for p in parts]))
            if self._decoding is not None:
                state = SequenceState.concatenate(self.model, [self._decoding.state, state])
                hidden = torch.cat([self._decoding.hidden, hidden])
                answering = self._decoding.rows + answering
            self._decoding = _Decoding(answering, state, hidden)
        return events

    def _with_answers(self, rows: list[_Sequence | _Plain], state: SequenceState, hidden: torch.Tensor
                      ) -> tuple[list[_Sequence | _Plain], SequenceState, torch.Tensor]:
        """A request asking for n answers gets n decoding rows, copies of its row's cache (and of its plain row,
        when guided): one training and one thought, n answers sampled apart."""
        def answers(row: _Sequence | _Plain) -> int:
            owner = _owner(row)
            return 1 if owner.writes_agent_text else owner.sampling.n

        if all(answers(row) == 1 for row in rows):
            return rows, state, hidden
        index: list[int] = []
        expanded: list[_Sequence | _Plain] = []
        for i, row in enumerate(rows):
            copies: list[_Sequence | _Plain] = [row]
            if answers(row) > 1 and isinstance(row, _Sequence):
                row.siblings = [self._answer_row(row, k) for k in range(1, row.sampling.n)]
                copies += row.siblings
            elif answers(row) > 1:  # the plain row of a guided request: one beside each answer
                copies += [_Plain(sibling) for sibling in row.owner.siblings]
            index += [i] * len(copies)
            expanded += copies
        state.select(torch.tensor(index, device=self.device))
        return expanded, state, hidden[index]

    def _answer_row(self, row: _Sequence, k: int) -> _Sequence:
        """Answer k of a request: its row's copy with a generator of its own, seeded seed + k."""
        generator = torch.Generator()
        if row.sampling.seed is None:
            generator.seed()
        else:
            seed = row.sampling.seed + k
            generator.manual_seed(seed - 2**64 if seed >= 2**64 else seed)
        return dataclasses.replace(row, choice=k, leader=row, siblings=[], ended={}, tokens=[],
                                   generator=generator, detokenizer=IncrementalDetokenizer(self.tokenizer,
                                                                                          row.sampling.stop))

    def _latent_turn(self, row: _Sequence, seconds: float) -> dict:
        """Record the latent agent that just ran (its piece) and move to the next."""
        piece = row.pieces[row.piece]
        row.prompt_tokens += len(piece.token_ids)
        role = row.team[row.piece]
        row.piece += 1
        row.agent = row.piece
        return {"role": role.name, "label": role.label, "kind": "latent", "prompt_tokens": len(piece.token_ids),
                "latent_positions": piece.latent_steps, "completion_tokens": 0, "seconds": seconds}

    @staticmethod
    def _agent_done(row: _Sequence, turn: dict) -> tuple[str, AgentDone]:
        row.trace.agent_turns.append(turn)
        return row.request_id, AgentDone(turn)

    def _thought(self, rows: list[_Sequence]
                 ) -> tuple[SequenceState, torch.Tensor, tuple[SequenceState, torch.Tensor, list[int]] | None]:
        """Each row's next piece of thought on its working memory (a single model's whole thought on an empty
        one), with its adapter where it was adapted. A row with contrastive feedback brings its base model along as
        a reference row of the same forwards (adapter off, fed the same latents, with a memory of its own).
        Returns the rows' state and last hidden states, and the references' (state, hidden, their rows) if any."""
        contrasted = [i for i, row in enumerate(rows) if row.adapted and row.ttt.contrastive_eta > 0]
        members = rows + [rows[i] for i in contrasted]
        memories = [row.memory for row in rows] + [rows[i].reference for i in contrasted]
        state = SequenceState.concatenate(self.model, [
            memory.state if memory else SequenceState.empty(self.model, 1, self.device) for memory in memories])
        hidden = torch.cat([memory.hidden if memory else self._no_hidden(1) for memory in memories])
        pieces = [[row.pieces[row.piece]] for row in members]
        with self._bind(members, [row.adapted for row in rows] + [False] * len(contrasted)):
            hidden = self._read_pieces(state, hidden, pieces, [row.ttt for row in members],
                                       [(i, len(rows) + k) for k, i in enumerate(contrasted)])
        if not contrasted:
            return state, hidden, None
        own = torch.arange(len(rows), device=self.device)
        twins = torch.arange(len(rows), len(members), device=self.device)
        references = SequenceState.concatenate(self.model, [state])  # a copy: select below works in place
        references.select(twins)
        state.select(own)
        return state, hidden[own], (references, hidden[twins], contrasted)

    def _read_follow_up(self, rows: list[_Sequence], state: SequenceState, hidden: torch.Tensor) -> torch.Tensor:
        """Feed each row's follow-up segment after its thought (adapter as while answering); returns the hidden
        state that gives each row's first answer token, (B, d)."""
        follow = [row.follow_ids for row in rows]
        if not any(follow):
            return hidden
        width = max(len(ids) for ids in follow)
        follow_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, device=self.device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=self.device)
        for index, ids in enumerate(follow):
            follow_ids[index, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=self.device)
            valid[index, :len(ids)] = True
        with self._bind(rows, [row.answers_with_adapter for row in rows]):
            read = extend(self.model, state, input_ids=follow_ids, valid=valid)
        last = torch.tensor([max(len(ids) - 1, 0) for ids in follow], device=self.device)
        has_follow = torch.tensor([bool(ids) for ids in follow], device=self.device)
        return torch.where(has_follow[:, None], read[torch.arange(len(rows)), last], hidden)

    def _decode_step(self) -> list[tuple[str, Event]]:
        """One token for every decoding request: choose it from its (guided) logits, emit its text, and feed the
        tokens of the rows that go on (a guided request's plain row gets its owner's token) as one batch."""
        batch = self._decoding
        with torch.no_grad():
            logits = self._guided_logits(batch.rows, self.lm_head(batch.hidden).float())  # (B, V)
            greedy = logits.argmax(-1).tolist()
        events: list[tuple[str, Event]] = []
        chosen: dict[int, int] = {}  # by id of the request going on: its token
        ended = []
        for index, row in enumerate(batch.rows):
            if isinstance(row, _Plain):
                continue
            try:
                token = greedy[index] if row.sampling.greedy else sample(logits[index], row.sampling, row.generator)
                finished = self._accept(row, token, events)
            except Exception as error:
                events.append(self._fail(row, error))  # leaves the batch through abort_request
                continue
            if finished:
                ended.append(row)
            else:
                chosen[id(row)] = token
        self._leave_decoding(ended)
        if chosen:
            batch = self._decoding
            tokens = torch.tensor([chosen[id(_owner(row))] for row in batch.rows], device=self.device)[:, None]
            if batch.stale:
                batch.binding = self._binding(batch.rows, [row.answers_with_adapter for row in batch.rows])
                batch.stale = False
            length = batch.state.length
            try:
                with torch.no_grad(), self._bound(batch.rows, batch.binding) as recurrence:
                    batch.hidden = extend(self.model, batch.state, input_ids=tokens)[:, -1]
                self._record_depths(batch.rows, recurrence)
                return events
            except Exception as error:
                failure = error
            events += self._feed_apart(batch, tokens, length, failure)
        return events

    def _feed_apart(self, batch: _Decoding, tokens: torch.Tensor, length: int, failure: Exception
                    ) -> list[tuple[str, Event]]:
        """After feeding the decoding batch its tokens failed: feed it again in halves, down to one row, so that
        only a request whose row fails alone fails (a batch too large for the memory left goes on as smaller
        ones); the rows fed become the decoding batch again, in their order."""
        batch.state.cache.crop_to(length)  # the layers the failed forward reached hold its keys: drop them
        self._release_memory(failure)
        log.warning("a decoding batch of %d failed (%r); feeding it again in halves", len(batch.rows), failure)
        singles = batch.state.split(self.model)
        batch.state = batch.hidden = None  # the copies in `singles` replace it
        fed: list[tuple[SequenceState, torch.Tensor, list[_Sequence | _Plain]]] = []
        failed: dict[int, tuple[_Sequence, Exception]] = {}  # by id of the request

        def feed(rows: range, error: Exception | None) -> None:
            if error is None:
                state = SequenceState.concatenate(self.model, [singles[i] for i in rows])
                part = [batch.rows[i] for i in rows]
                try:
                    with torch.no_grad(), self._bind(part, [row.answers_with_adapter for row in part]) as recurrence:
                        fed.append((state, extend(self.model, state, input_ids=tokens[rows.start:rows.stop])[:, -1],
                                    part))
                    self._record_depths(part, recurrence)
                    return
                except Exception as raised:
                    error = raised
                del state
                self._release_memory(error)
            if len(rows) == 1:
                owner = _owner(batch.rows[rows.start])
                failed.setdefault(id(owner), (owner, error))
                return
            middle = (rows.start + rows.stop) // 2
            feed(range(rows.start, middle), None)
            feed(range(middle, rows.stop), None)

        feed(range(len(batch.rows)), failure)
        if fed:
            batch.rows = [row for *_, part in fed for row in part]
            batch.state = SequenceState.concatenate(self.model, [state for state, *_ in fed])
            batch.hidden = torch.cat([hidden for _, hidden, _ in fed])
            batch.stale = True
        else:
            self._decoding = None
        # A failed request leaves the batch (its own and its plain row) through abort_request.
        return [self._fail(row, error) for row, error in failed.values() if row.request_id in self._sequences]

    @staticmethod
    def _record_depths(rows: list[_Sequence | _Plain], recurrence: Recurrence | None) -> None:
        """Each answer position just read back: the recurrences it ran, kept by its request for the trace."""
        if recurrence is None or recurrence.used is None:
            return
        for row, used in zip(rows, recurrence.used[:, -1].tolist(), strict=True):
            if isinstance(row, _Sequence) and not row.writes_agent_text:
                (row.leader or row).answer_depths.append(used)

    @staticmethod
    def _guided_logits(rows: list[_Sequence | _Plain], logits: torch.Tensor) -> torch.Tensor:
        """Each guided request's logits become l_plain + w (l_own - l_plain) (latent reasoning read as guidance,
        arXiv 2511.16886; notes section 10), with l_plain from its plain row; other rows are left as they are."""
        plain = [i for i, row in enumerate(rows) if isinstance(row, _Plain)]
        if not plain:
            return logits
        index_of = {id(row): i for i, row in enumerate(rows)}
        own = [index_of[id(rows[i].owner)] for i in plain]
        weight = torch.tensor([rows[i].owner.ttt.guidance for i in plain], device=logits.device)[:, None]
        logits[own] = logits[plain] + weight * (logits[own] - logits[plain])
        return logits

    def _accept(self, row: _Sequence, token: int, events: list[tuple[str, Event]]) -> bool:
        """Take a row's next token; returns True when the row leaves the decoding batch: it has finished (its events
        appended), or it was a TextMAS agent whose turn has ended (the request thinks again for the next agent)."""
        agent_text = row.writes_agent_text
        limit = row.ttt.agent_max_tokens if agent_text else row.sampling.max_tokens
        finish_reason = None
        if token in self.stop_ids and (agent_text or not row.sampling.ignore_eos):
            finish_reason = "stop"
        else:
            row.tokens.append(token)
            if len(row.tokens) == 1 and not agent_text:
                row.trace.timings["first_token_s"] = time.perf_counter() - row.start
            delta = row.detokenizer.push(token)
            if delta and not agent_text:
                events.append((row.request_id, TextDelta(delta, row.choice)))
            if row.detokenizer.stopped:
                finish_reason = "stop"
            elif len(row.tokens) >= limit:
                finish_reason = "length"
        if finish_reason is None:
            return False
        tail = row.detokenizer.finish()
        now = time.perf_counter()
        if agent_text:
            events.append(self._end_agent_text(row, now))
            return True
        if tail:
            events.append((row.request_id, TextDelta(tail, row.choice)))
        request = row.leader or row
        request.ended[row.choice] = Choice(row.choice, row.detokenizer.text, finish_reason, row.tokens)
        if len(request.ended) < request.sampling.n:
            return True  # this answer has ended; the request ends with its last
        choices = [request.ended[k] for k in range(request.sampling.n)]
        completion_tokens = sum(len(choice.token_ids) for choice in choices)
        request.trace.timings["decode_s"] = now - request.decode_start
        request.trace.timings["total_s"] = now - request.start
        depths = request.answer_depths
        if depths:
            request.trace.recurrences = {"mean": sum(depths) / len(depths), "min": min(depths), "max": max(depths),
                                         "positions": len(depths)}
        if request.team:
            role = request.team[-1]
            request.trace.agent_turns.append({
                "role": role.name, "label": role.label, "kind": "answer", "prompt_tokens": len(request.prompt_ids),
                "latent_positions": 0, "completion_tokens": completion_tokens, "seconds": now - request.decode_start})
        prompt_tokens = request.prompt_tokens or len(request.segments.prompt_ids)
        usage = Usage(prompt_tokens, request.agent_tokens + completion_tokens)
        first = choices[0]
        result = Result(first.text, first.finish_reason, usage, request.trace, first.token_ids, choices=choices)
        if request.return_adapter and request.adapted:  # before the slot goes back: the next request resets it
            result.adapter = export_adapter(self.bank, request.slot, request.ttt.rank, request.ttt.alpha,
                                            request.ttt.targets, self.base_model_name)
            request.trace.adapter = result.adapter.summary()
        events.append((request.request_id, Finished(result)))
        self._sequences.pop(request.request_id, None)
        if request.slot is not None:
            self.bank.release(request.slot)
        return True

    def _end_agent_text(self, row: _Sequence, now: float) -> tuple[str, AgentDone]:
        """A TextMAS agent's turn has ended: its text joins the context of the agents after it, and the request
        goes back to the think phase for the next agent's fresh prompt."""
        role, text = row.team[row.agent], row.detokenizer.text
        turn = {"role": role.name, "label": role.label, "kind": "text", "prompt_tokens": len(row.prompt_ids),
                "latent_positions": 0, "completion_tokens": len(row.tokens), "seconds": now - row.decode_start,
                "text": text}
        row.context.append(labelled(role, text))
        row.agent_tokens += len(row.tokens)
        row.tokens = []
        row.agent += 1
        row.answer_prompt = self._agent_turn(row, row.team[row.agent], 0)
        row.phase = "think"
        return self._agent_done(row, turn)

    def _leave_decoding(self, rows: list[_Sequence]) -> None:
        """Drop rows from the decoding batch (finished, aborted or failed)."""
        batch = self._decoding
        if batch is None or not rows:
            return
        keep = [i for i, row in enumerate(batch.rows) if _owner(row) not in rows]
        if not keep:
            self._decoding = None
            return
        index = torch.tensor(keep, device=self.device)
        batch.state.select(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.hidden = batch.hidden[index]
        batch.stale = True
