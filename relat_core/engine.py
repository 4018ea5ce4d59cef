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
Requests run together as the rows of one batch (continuous batching, as vLLM does for decoding): the requests
still training share one forward and backward pass per step, each row through its own adapter slot, and the
requests answering share one forward pass per token. `add_request` / `step` / `abort_request` drive it;
`generate` runs one request alone as a stream of TrainStep, TextDelta and Finished events.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .chat import ChatFormat, Segments, normalise_messages
from .decoding import IncrementalDetokenizer, sample
from .latent import LatentMap, SequenceState, extend, latent_rollout, reconstruction_loss
from .loading import LoadedModel
from .lora import Binding, SlotBank
from .params import ALL_TARGETS, InvalidParameter, SamplingParams, TTTParams

log = logging.getLogger("relat_core")

DEFAULT_ADAPTER_SEED = 0  # adapters are drawn from the request's seed, else this: same request, same answer


class EngineBusy(RuntimeError):
    """Every adapter slot is leased."""


@dataclass
class Request:
    messages: list[dict]
    ttt: TTTParams = field(default_factory=TTTParams)
    sampling: SamplingParams = field(default_factory=SamplingParams)


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
    steps: list[dict] = field(default_factory=list)  # {step, loss, grad_norm, seconds}
    recon_loss_before: float | None = None
    recon_loss_after: float | None = None
    stopped_early: bool = False
    aborted: str | None = None  # why the update was abandoned and the base model answered
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" or "length"
    usage: Usage
    trace: Trace
    token_ids: list[int]


@dataclass
class Finished:
    result: Result




@dataclass
class Failed:
    """This request failed on its own (its sampling, its text, its batch row run alone); the others go on."""

    error: Exception


Event = TrainStep | TextDelta | Finished | Failed


@dataclass(eq=False)
class _Sequence:
    """One request's life in the engine: training ("train"), the latent thought with the final weights ("think"),
    then decoding ("decode") as a row of the decoding batch."""

    request_id: str
    segments: Segments
    ttt: TTTParams
    sampling: SamplingParams
    trace: Trace
    start: float
    slot: int | None = None  # the leased adapter slot (relat)
    phase: str = "think"
    step: int = 0  # training steps taken
    adapted: bool = False  # training ended with an adapter the answer may use
    loss_now: float | None = None  # the loss at the current weights, when it was measured last (an early stop)
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    tokens: list[int] = field(default_factory=list)
    decode_start: float = 0.0

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


class Engine:
    """Runs many requests as one batch: `add_request`, then `step` until they finish (continuous batching).

    Each `step` advances every request by one unit of work: one batched training step for the requests still
    training, the latent thought of those that just finished training (or need none), and one decoding step for
    every request that is answering. Requests join between steps and leave as they finish or are aborted; each
    gets the losses and answer it would get alone (tests/test_batching.py). Not thread-safe: one thread owns it.
    """

    def __init__(self, loaded: LoadedModel, max_rank: int = 64, num_slots: int = 1,
                 defaults: TTTParams | None = None, decode_share: float = 0.8):
        if not 0 <= decode_share < 1:
            raise ValueError("decode_share must be in [0, 1)")
        # While some requests train and others answer: the share of the engine's time that goes to answering
        # (0: one token per training step). A batched training step costs as much as tens of tokens: one token
        # per step would stretch an answer over minutes while others train, and the requests answering would pile
        # up and leave the training batch small (bench/RESULTS.md, section 6: 0.5 halved throughput through HTTP).
        self.decode_share = decode_share
        self._decode_credit = 0.0  # seconds of answering owed since the last training step
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.device = self.model.device
        self.chat = ChatFormat(self.tokenizer)
        self.latent_map = LatentMap(self.model)  # realignment solved once, not per request
        self.lm_head = self.model.get_output_embeddings()
        self.bank = SlotBank(self.model, num_slots=num_slots, max_rank=max_rank, targets=ALL_TARGETS)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.defaults = defaults or default_ttt_params(self.num_parameters)
        self.stop_ids = self._stop_token_ids()
        self._sequences: dict[str, _Sequence] = {}  # in arrival order
        self._decoding: _Decoding | None = None

    def _stop_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
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
        if request.ttt.trains and request.ttt.rank > self.bank.max_rank:
            raise InvalidParameter("rank", f"rank must be at most {self.bank.max_rank} on this server")
        return messages

    def add_request(self, request_id: str, request: Request) -> None:
        """Admit a request; it starts with the next `step`. Raises InvalidParameter, or EngineBusy when a `relat`
        request finds every adapter slot leased."""
        if request_id in self._sequences:
            raise ValueError(f"request {request_id!r} is already in the engine")
        messages = self.check(request)
        ttt, sampling = request.ttt, request.sampling
        thinks = ttt.method != "direct" and ttt.latent_steps > 0
        segments = self.chat.segments(messages, ttt.reconstruction_instruction, ttt.follow_up, latent=thinks)
        # Each option as it applies to this request (the trace reports what ran, not what was asked).
        from_thought = thinks and not (ttt.method == "relat" and ttt.answer_context == "question")
        trace = Trace(ttt.method, ttt.latent_steps if thinks else 0, adapter_during_answer=False,
                      answer_context="thought" if from_thought else "question",
                      guidance=ttt.guidance if ttt.guided else 1.0,
                      contrastive_eta=ttt.contrastive_eta if ttt.trains else 0.0)
        sequence = _Sequence(request_id, segments, ttt, sampling, trace, time.perf_counter())
        if ttt.trains:
            slot = self.bank.acquire()
            if slot is None:
                raise EngineBusy("no free adapter slot")
            seed = sampling.seed if sampling.seed is not None else DEFAULT_ADAPTER_SEED
            self.bank.reset(slot, ttt.rank, ttt.targets, torch.Generator(self.device).manual_seed(seed))
            sequence.slot, sequence.phase = slot, "train"
        self._sequences[request_id] = sequence

    def abort_request(self, request_id: str) -> None:
        """Drop a request between steps (cancelled, past its deadline); its slot is free for the next one at once.
        Unknown or finished ids are ignored."""
        sequence = self._sequences.pop(request_id, None)
        if sequence is None:
            return
        if sequence.slot is not None:
            self.bank.release(sequence.slot)
        if sequence.phase == "decode":
            self._leave_decoding([sequence])

    def step(self) -> list[tuple[str, Event]]:
        """One unit of work: a training step of every request still training, unless the answering requests still
        have time owed from the last one (`decode_share`); then one token of every answering request. Returns
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
        """Run a phase over its rows as one batch; if the batch fails, run each row alone so that only the row
        that fails alone fails (the training and thinking phases change nothing until they succeed)."""
        try:
            return phase(rows)
        except Exception as error:
            if len(rows) == 1:
                return [self._fail(rows[0], error)]
            log.exception("a batch of %d failed; running its requests one at a time", len(rows))
        events = []
        for row in rows:
            try:
                events += phase([row])
            except Exception as error:
                events.append(self._fail(row, error))
        return events

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

    def _bind(self, rows: list[_Sequence], on: list[bool]):
        """The forwards inside run each row through its adapter where on[i] (one binding, gathered once)."""
        return self.bank.bound(self._binding(rows, on))

    # -- phases ---------------------------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]]) -> tuple[SequenceState, torch.Tensor]:
        """Prefill prompts as one left-padded batch; returns the state and each row's last hidden state, (B, d)."""
        batch, width = len(prompts), max(len(ids) for ids in prompts)
        prompt = torch.full((batch, width), self.tokenizer.pad_token_id, device=self.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        for index, ids in enumerate(prompts):
            prompt[index, width - len(ids):] = torch.tensor(ids, device=self.device)
            valid[index, width - len(ids):] = True
        state = SequenceState.empty(self.model, batch, self.device)
        return state, extend(self.model, state, input_ids=prompt, valid=valid)[:, -1]

    def _think(self, rows: list[_Sequence], contrast: list[tuple[int, int]] = ()
               ) -> tuple[SequenceState, torch.Tensor]:
        """Prefill the prompts (left-padded) and run each row's latent thought; returns the state and the last
        hidden state of each row, (B, d). A row with a shorter thought gets padding positions, invisible to all.
        contrast: (row, reference) pairs of contrastive feedback (latent_rollout); a reference is a row too."""
        state, hidden = self._prefill([row.segments.prompt_ids for row in rows])
        hidden = latent_rollout(self.model, state, hidden, [row.trace.latent_steps for row in rows], self.latent_map,
                                [row.ttt for row in rows], contrast)
        return state, hidden

    def _reconstruction(self, rows: list[_Sequence], state: SequenceState, scored: list[bool] | None = None
                        ) -> torch.Tensor:
        """Per-row reconstruction loss (B,): the question's tokens after the latent thought, with the question's
        own prompt positions hidden (prompts are left-padded to a common width in `state`). Rows not `scored`
        take no part (all padding; their loss is 0)."""
        scored = scored or [True] * len(rows)
        segments = [row.segments for row in rows]
        batch = len(segments)
        width = max(len(s.prompt_ids) for s in segments)
        length = max(len(s.recon_ids) for s, use in zip(segments, scored, strict=True) if use)
        recon_ids = torch.full((batch, length), self.tokenizer.pad_token_id, device=self.device)
        labels = torch.full((batch, length), -100, device=self.device)
        valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        question_keys = torch.zeros(batch, state.length, dtype=torch.bool, device=self.device)
        for index, (s, use) in enumerate(zip(segments, scored, strict=True)):
            if use:
                recon_ids[index, :len(s.recon_ids)] = torch.tensor(s.recon_ids, device=self.device)
                labels[index, :len(s.recon_labels)] = torch.tensor(s.recon_labels, device=self.device)
                valid[index, :len(s.recon_ids)] = True
                question_keys[index, width - len(s.prompt_ids) + s.question_start:width] = True
        return reconstruction_loss(self.model, state, recon_ids, valid, labels, question_keys)

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

    @staticmethod
    def _end_training(row: _Sequence, adapted: bool) -> None:
        row.adapted = adapted
        row.trace.adapter_during_answer = row.answers_with_adapter
        row.phase = "think"

    def _start_decoding(self, rows: list[_Sequence]) -> list[tuple[str, Event]]:
        """Think with the final weights (each row's own adapter or none), score the adapted rows' reconstruction,
        read the follow-up, then join the decoding batch (the first token comes in this same engine step).

        Rows that answer from the prompt alone (direct; relat with answer_context "question") are prefilled
        afresh, each with its adapter on or off, and so are the plain rows of guided requests (adapter off);
        they think only when a reconstruction loss is still to be reported."""
        start = time.perf_counter()
        thinking = [row for row in rows if row.answers_after_thought or row.needs_score]
        answering: list[_Sequence | _Plain] = []  # the decoding rows, in the order of `parts`
        parts: list[tuple[SequenceState, torch.Tensor]] = []
        losses: dict[int, float] = {}  # by id of the row
        with torch.no_grad():
            if thinking:
                state, hidden = self._thought(thinking)
                scored = [row.needs_score for row in thinking]
                if any(scored):
                    length, position = state.length, state.next_position
                    with self._bind(thinking, [row.adapted for row in thinking]):
                        values = self._reconstruction(thinking, state, scored).tolist()
                    state.truncate(length, position)
                    losses = {id(row): value for row, value, use in zip(thinking, values, scored, strict=True) if use}
                keep = [i for i, row in enumerate(thinking) if row.answers_after_thought]
                if len(keep) < len(thinking) and keep:
                    state.select(torch.tensor(keep, device=self.device))
                    hidden = hidden[keep]
                if keep:
                    after = [thinking[i] for i in keep]
                    parts.append((state, self._read_follow_up(after, state, hidden)))
                    answering += after
            plain: list[_Sequence | _Plain] = [row for row in rows if not row.answers_after_thought]
            plain += [_Plain(row) for row in rows if row.ttt.guided]
            if plain:
                with self._bind(plain, [row.answers_with_adapter for row in plain]):
                    parts.append(self._prefill([_owner(row).segments.prompt_ids for row in plain]))
                answering += plain
        now = time.perf_counter()
        for row in rows:
            if id(row) in losses:
                row.trace.recon_loss_after = losses[id(row)]
            elif row.adapted:
                row.trace.recon_loss_after = row.loss_now
            row.trace.timings["train_s"] = start - row.start
            row.trace.timings["think_s"] = now - start
            row.generator = torch.Generator()
            if row.sampling.seed is not None:
                row.generator.manual_seed(row.sampling.seed)
            else:
                row.generator.seed()
            row.detokenizer = IncrementalDetokenizer(self.tokenizer, row.sampling.stop)
            row.decode_start, row.phase = now, "decode"
        if self._decoding is not None:
            parts.insert(0, (self._decoding.state, self._decoding.hidden))
            answering = self._decoding.rows + answering
        state = parts[0][0] if len(parts) == 1 else SequenceState.concatenate(self.model, [p[0] for p in parts])
        self._decoding = _Decoding(answering, state, torch.cat([p[1] for p in parts]))
        return []

    def _thought(self, rows: list[_Sequence]) -> tuple[SequenceState, torch.Tensor]:
        """The final latent thought of each row, with its adapter where it was adapted. A row with contrastive
        feedback brings its base model along as a reference row of the same forwards (adapter off, fed the same
        latents), dropped afterwards."""
        contrasted = [i for i, row in enumerate(rows) if row.adapted and row.ttt.contrastive_eta > 0]
        batch = rows + [rows[i] for i in contrasted]
        with self._bind(batch, [row.adapted for row in rows] + [False] * len(contrasted)):
            state, hidden = self._think(batch, [(i, len(rows) + k) for k, i in enumerate(contrasted)])
        if contrasted:
            state.select(torch.arange(len(rows), device=self.device))
            hidden = hidden[:len(rows)]
        return state, hidden

    def _read_follow_up(self, rows: list[_Sequence], state: SequenceState, hidden: torch.Tensor) -> torch.Tensor:
        """Feed each row's follow-up segment after its thought (adapter as while answering); returns the hidden
        state that gives each row's first answer token, (B, d)."""
        follow = [row.segments.follow_ids for row in rows]
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
            with torch.no_grad(), self.bank.bound(batch.binding):
                batch.hidden = extend(self.model, batch.state, input_ids=tokens)[:, -1]
        return events

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
        """Take a row's next token; returns True when the row has finished (its events appended)."""
        finish_reason = None
        if token in self.stop_ids and not row.sampling.ignore_eos:
            finish_reason = "stop"
        else:
            row.tokens.append(token)
            if len(row.tokens) == 1:
                row.trace.timings["first_token_s"] = time.perf_counter() - row.start
            delta = row.detokenizer.push(token)
            if delta:
                events.append((row.request_id, TextDelta(delta)))
            if row.detokenizer.stopped:
                finish_reason = "stop"
            elif len(row.tokens) >= row.sampling.max_tokens:
                finish_reason = "length"
        if finish_reason is None:
            return False
        tail = row.detokenizer.finish()
        if tail:
            events.append((row.request_id, TextDelta(tail)))
        now = time.perf_counter()
        row.trace.timings["decode_s"] = now - row.decode_start
        row.trace.timings["total_s"] = now - row.start
        usage = Usage(len(row.segments.prompt_ids), len(row.tokens))
        result = Result(row.detokenizer.text, finish_reason, usage, row.trace, row.tokens)
        events.append((row.request_id, Finished(result)))
        self._sequences.pop(row.request_id, None)
        if row.slot is not None:
            self.bank.release(row.slot)
        return True

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
