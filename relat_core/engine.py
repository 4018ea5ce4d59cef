"""The engine: `direct`, `latent` (open loop) and `relat` (closed loop) behind one streaming interface.

relat, per request (arXiv 2606.06252):
  1. a fresh LoRA slot (B = 0, so step 0 is the base model);
  2. N times: prefill the question, run L latent steps, rebuild the question from the latent thought alone
     (masked cross-entropy), backpropagate through the whole rollout into the slot, one clipped AdamW step;
  3. with the adapted weights, prefill and think again, then decode the answer after the follow-up segment,
     with the adapter on or off;
  4. the slot is released; the base weights are never touched (they have no gradient and no optimiser).
`generate` yields a TrainStep per step, TextDelta as text becomes safe to show, and Finished at the end, so a
caller can stop between steps or tokens simply by closing the iterator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from .chat import ChatFormat, Segments, normalise_messages
from .decoding import IncrementalDetokenizer, sample
from .latent import LatentMap, SequenceState, extend, latent_rollout, reconstruction_loss
from .loading import LoadedModel
from .lora import SlotBank
from .params import ALL_TARGETS, InvalidParameter, SamplingParams, TTTParams

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


Event = TrainStep | TextDelta | Finished


@dataclass
class _Adapting:
    """A request whose adapter is being trained: the row a training batch is made of."""

    segments: Segments
    ttt: TTTParams
    slot: int
    trace: Trace
    step: int = 0  # steps taken
    done: bool = False
    loss_now: float | None = None  # the loss at the current weights, when it was measured last (an early stop)


def default_ttt_params(num_parameters: int) -> TTTParams:
    """The engine's default for a model of this size (bench/RESULTS.md, "the search for the default").

    Below 1B parameters: measured on SmolLM2-135M, where long latent thoughts and long training hurt answers.
    From 1B on, unmeasured here (no GPU, no large weights): the paper's published L=16 and N=5 (rank 8 is common
    to both); of the choices the paper leaves open, the adapter stays off while answering (an adapter trained to
    rebuild the question pulls answers toward repeating it, whatever the size), and the bridge replaces the
    restatement, which made up for a small model that reads its own latents badly.
    """
    if num_parameters < 1_000_000_000:
        return TTTParams()
    return TTTParams(latent_steps=16, steps=5, follow_up="bridge")


class Engine:
    def __init__(self, loaded: LoadedModel, max_rank: int = 64, num_slots: int = 1,
                 defaults: TTTParams | None = None):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.device = self.model.device
        self.chat = ChatFormat(self.tokenizer)
        self.latent_map = LatentMap(self.model)  # realignment solved once, not per request
        self.bank = SlotBank(self.model, num_slots=num_slots, max_rank=max_rank, targets=ALL_TARGETS)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.defaults = defaults or default_ttt_params(self.num_parameters)
        self.stop_ids = self._stop_token_ids()

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

    def check(self, request: Request) -> list[dict[str, str]]:
        """Refuse what this engine cannot run (InvalidParameter); returns the normalised messages.

        Cheap and thread-safe (no tokenizer, no tensors), so a server can call it before queueing a request.
        """
        messages = normalise_messages(request.messages)
        if request.ttt.trains and request.ttt.rank > self.bank.max_rank:
            raise InvalidParameter("rank", f"rank must be at most {self.bank.max_rank} on this server")
        return messages

    def generate(self, request: Request) -> Iterator[Event]:
        """Check the request now, then return its event stream; close the stream to cancel the request (its
        adapter slot is released at once)."""
        return self._generate(request, self.check(request))

    def _generate(self, request: Request, messages: list[dict[str, str]]) -> Iterator[Event]:
        start = time.perf_counter()
        ttt, sampling = request.ttt, request.sampling
        thinks = ttt.method != "direct" and ttt.latent_steps > 0
        segments = self.chat.segments(messages, ttt.reconstruction_instruction, ttt.follow_up, latent=thinks)
        trace = Trace(ttt.method, ttt.latent_steps if thinks else 0, adapter_during_answer=False)
        slot = None
        try:
            adapted = False
            if ttt.trains:
                slot = self.bank.acquire()
                if slot is None:
                    raise EngineBusy("no free adapter slot")
                seed = sampling.seed if sampling.seed is not None else DEFAULT_ADAPTER_SEED
                self.bank.reset(slot, ttt.rank, ttt.targets, torch.Generator(self.device).manual_seed(seed))
                loss_now = yield from self._train(segments, ttt, slot, trace)
                adapted = trace.aborted is None
                trace.adapter_during_answer = adapted and ttt.adapter_during_answer
            trace.timings["train_s"] = time.perf_counter() - start

            think_start = time.perf_counter()
            with torch.no_grad():
                with self._adapter(slot if adapted else None, ttt):
                    state, hidden = self._think([segments], [ttt], thinks)
                    if adapted:
                        trace.recon_loss_after = loss_now if loss_now is not None else self._score(segments, state)
            trace.timings["think_s"] = time.perf_counter() - think_start
            yield from self._answer(segments, ttt, sampling, slot if adapted else None, state, hidden, trace, start)
        finally:
            if slot is not None:
                self.bank.release(slot)

    def adapt(self, requests: list[Request]) -> list[Trace]:
        """Train several requests' adapters together, each for its own N steps (or until it stops early), as one
        batch whose finished rows leave it; returns their traces and releases their slots. The training phase
        of `generate`, batched: it gives each request the losses and updates it would get alone."""
        rows: list[_Adapting] = []
        try:
            for request in requests:
                messages = self.check(request)
                ttt = request.ttt
                if not ttt.trains:
                    raise InvalidParameter("method", "adapt needs relat requests with at least one step")
                slot = self.bank.acquire()
                if slot is None:
                    raise EngineBusy("no free adapter slot")
                seed = request.sampling.seed if request.sampling.seed is not None else DEFAULT_ADAPTER_SEED
                self.bank.reset(slot, ttt.rank, ttt.targets, torch.Generator(self.device).manual_seed(seed))
                segments = self.chat.segments(messages, ttt.reconstruction_instruction, ttt.follow_up, latent=True)
                rows.append(_Adapting(segments, ttt, slot, Trace("relat", ttt.latent_steps, False)))
            while active := [row for row in rows if not row.done]:
                for _ in self._train_step(active):
                    pass
            return [row.trace for row in rows]
        finally:
            for row in rows:
                self.bank.release(row.slot)

    def run(self, request: Request) -> Result:
        """Run a request to the end and return its result."""
        for event in self.generate(request):
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("generate ended without a result")

    # -- phases ---------------------------------------------------------------------------------------------

    def _adapter(self, slot: int | None, ttt: TTTParams):
        """One request's adapter on for the forwards inside, or none (the base model) when slot is None."""
        return nullcontext() if slot is None else self._bind([(slot, ttt)])

    def _bind(self, rows: list[tuple[int, TTTParams]]):
        """Batch row i runs through slot rows[i][0] with its request's scale, targets and rank."""
        return self.bank.bind([slot for slot, _ in rows], [ttt.alpha / ttt.rank for _, ttt in rows],
                              {kind for _, ttt in rows for kind in ttt.targets}, max(ttt.rank for _, ttt in rows))

    def _think(self, segments: list[Segments], ttts: list[TTTParams], thinks: bool
               ) -> tuple[SequenceState, torch.Tensor]:
        """Prefill the prompts (left-padded) and run each row's latent thought; returns the state and the last
        hidden state of each row, (B, d). A row with a shorter thought gets padding positions, invisible to all."""
        batch = len(segments)
        width = max(len(s.prompt_ids) for s in segments)
        prompt = torch.full((batch, width), self.tokenizer.pad_token_id, device=self.device)
        valid = torch.zeros(batch, width, dtype=torch.bool, device=self.device)
        for row, s in enumerate(segments):
            prompt[row, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids, device=self.device)
            valid[row, width - len(s.prompt_ids):] = True
        state = SequenceState.empty(self.model, batch, self.device)
        hidden = extend(self.model, state, input_ids=prompt, valid=valid)[:, -1]  # (B, d)
        steps = [ttt.latent_steps if thinks else 0 for ttt in ttts]
        hidden = latent_rollout(self.model, state, hidden, steps, self.latent_map, [ttt.mapping for ttt in ttts],
                                [ttt.residual_alpha for ttt in ttts])
        return state, hidden

    def _reconstruction(self, segments: list[Segments], state: SequenceState) -> torch.Tensor:
        """Per-row reconstruction loss (B,): the question's tokens after the latent thought, with the question's
        own prompt positions hidden (prompts are left-padded to a common width in `state`)."""
        batch = len(segments)
        width = max(len(s.prompt_ids) for s in segments)
        length = max(len(s.recon_ids) for s in segments)
        recon_ids = torch.full((batch, length), self.tokenizer.pad_token_id, device=self.device)
        labels = torch.full((batch, length), -100, device=self.device)
        valid = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        question_keys = torch.zeros(batch, state.length, dtype=torch.bool, device=self.device)
        for row, s in enumerate(segments):
            recon_ids[row, :len(s.recon_ids)] = torch.tensor(s.recon_ids, device=self.device)
            labels[row, :len(s.recon_labels)] = torch.tensor(s.recon_labels, device=self.device)
            valid[row, :len(s.recon_ids)] = True
            question_keys[row, width - len(s.prompt_ids) + s.question_start:width] = True
        return reconstruction_loss(self.model, state, recon_ids, valid, labels, question_keys)

    def _score(self, segments: Segments, state: SequenceState) -> float:
        """Reconstruction loss of the current weights, leaving the state as it was."""
        length, position = state.length, state.next_position
        loss = float(self._reconstruction([segments], state)[0])
        state.truncate(length, position)
        return loss

    def _train(self, segments: Segments, ttt: TTTParams, slot: int, trace: Trace) -> Iterator[Event]:
        """Test-time training of one request (a batch of one); returns the loss at the final weights if it was
        measured."""
        row = _Adapting(segments, ttt, slot, trace)
        while not row.done:
            yield from self._train_step([row])
        return row.loss_now

    def _train_step(self, rows: list[_Adapting]) -> Iterator[TrainStep]:
        """One training step of every row as one batched forward and backward pass; each row's loss reaches only
        its own slot, so its update is exactly the one it would get alone. Rows that stop or fail are marked done."""
        start = time.perf_counter()
        optimizer = self.bank.optimizer
        self.bank.zero_grad()
        with self._bind([(row.slot, row.ttt) for row in rows]):
            state, _ = self._think([row.segments for row in rows], [row.ttt for row in rows], thinks=True)
            losses = self._reconstruction([row.segments for row in rows], state)
        values = losses.tolist()
        stepping = []
        for index, (row, value) in enumerate(zip(rows, values, strict=True)):
            row.step += 1
            if row.step == 1:
                row.trace.recon_loss_before = value
            if not math.isfinite(value):
                self._abort(row, f"non-finite reconstruction loss at step {row.step}")
            elif row.ttt.stop_loss is not None and value <= row.ttt.stop_loss:
                row.trace.stopped_early = True
                row.loss_now, row.done = value, True
                yield self._record(row, value, None, time.perf_counter() - start)
            else:
                stepping.append(index)
        if stepping:
            losses[stepping].sum().backward()
            del state, losses  # frees the graph's activations before the optimiser allocates
            slots = torch.tensor([rows[i].slot for i in stepping], device=self.device)
            norms = optimizer.grad_norms(slots)
            finite = torch.isfinite(norms)
            for i, ok in zip(stepping, finite.tolist(), strict=True):
                if not ok:
                    self._abort(rows[i], f"non-finite gradient at step {rows[i].step}")
            kept = [i for i, ok in zip(stepping, finite.tolist(), strict=True) if ok]
            if kept:
                def column(name: str) -> torch.Tensor:
                    return torch.tensor([getattr(rows[i].ttt, name) for i in kept], device=self.device)

                optimizer.step(slots[finite], column("lr"), column("weight_decay"), column("max_grad_norm"),
                               norms[finite])
            seconds = time.perf_counter() - start
            for i, norm in zip(stepping, norms.tolist(), strict=True):
                row = rows[i]
                if row.trace.aborted is None:
                    row.done = row.step >= row.ttt.steps
                    yield self._record(row, values[i], norm, seconds)
        self.bank.zero_grad()

    @staticmethod
    def _record(row: _Adapting, loss: float, grad_norm: float | None, seconds: float) -> TrainStep:
        row.trace.steps.append({"step": row.step, "loss": loss, "grad_norm": grad_norm, "seconds": seconds})
        return TrainStep(row.step, row.ttt.steps, loss, grad_norm, seconds)

    @staticmethod
    def _abort(row: _Adapting, reason: str) -> None:
        """Abandon the update: the slot is not bound again, so the base model answers; the trace says why."""
        row.trace.aborted = reason
        row.done = True

    def _answer(self, segments: Segments, ttt: TTTParams, sampling: SamplingParams, slot: int | None,
                state: SequenceState, hidden: torch.Tensor, trace: Trace, start: float) -> Iterator[Event]:
        decode_start = time.perf_counter()
        generator = torch.Generator()
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
        detokenizer = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        lm_head = self.model.get_output_embeddings()
        answer_slot = slot if ttt.adapter_during_answer else None
        finish_reason = "length"
        tokens: list[int] = []
        with torch.no_grad(), self._adapter(answer_slot, ttt):
            if segments.follow_ids:
                follow = torch.tensor([segments.follow_ids], device=self.device)
                hidden = extend(self.model, state, input_ids=follow)[:, -1]
            while len(tokens) < sampling.max_tokens:
                token = sample(lm_head(hidden)[0], sampling, generator)
                if token in self.stop_ids:
                    finish_reason = "stop"
                    break
                tokens.append(token)
                if len(tokens) == 1:
                    trace.timings["first_token_s"] = time.perf_counter() - start
                delta = detokenizer.push(token)
                if delta:
                    yield TextDelta(delta)
                if detokenizer.stopped:
                    finish_reason = "stop"
                    break
                if len(tokens) < sampling.max_tokens:
                    hidden = extend(self.model, state, input_ids=torch.tensor([[token]], device=self.device))[:, -1]
        tail = detokenizer.finish()
        if tail:
            yield TextDelta(tail)
        trace.timings["decode_s"] = time.perf_counter() - decode_start
        trace.timings["total_s"] = time.perf_counter() - start
        usage = Usage(len(segments.prompt_ids), len(tokens))
        yield Finished(Result(detokenizer.text, finish_reason, usage, trace, tokens))
