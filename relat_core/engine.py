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
                    state, hidden = self._think(segments, ttt, thinks)
                    if adapted:
                        trace.recon_loss_after = loss_now if loss_now is not None else self._score(segments, state)
            trace.timings["think_s"] = time.perf_counter() - think_start
            yield from self._answer(segments, ttt, sampling, slot if adapted else None, state, hidden, trace, start)
        finally:
            if slot is not None:
                self.bank.release(slot)

    def run(self, request: Request) -> Result:
        """Run a request to the end and return its result."""
        for event in self.generate(request):
            if isinstance(event, Finished):
                return event.result
        raise AssertionError("generate ended without a result")

    # -- phases ---------------------------------------------------------------------------------------------

    def _adapter(self, slot: int | None, ttt: TTTParams):
        if slot is None:
            return nullcontext()
        return self.bank.bind([slot], [ttt.alpha / ttt.rank], ttt.targets, ttt.rank)

    def _think(self, segments: Segments, ttt: TTTParams, thinks: bool) -> tuple[SequenceState, torch.Tensor]:
        """Prefill the prompt and run the latent thought; returns the state and the last hidden state (1, d)."""
        state = SequenceState.empty(self.model, 1, self.device)
        prompt = torch.tensor([segments.prompt_ids], device=self.device)
        hidden = extend(self.model, state, input_ids=prompt)[:, -1]
        if thinks:
            hidden = latent_rollout(self.model, state, hidden, ttt.latent_steps, self.latent_map, ttt.mapping,
                                    ttt.residual_alpha)
        return state, hidden

    def _reconstruction(self, segments: Segments, state: SequenceState) -> torch.Tensor:
        recon_ids = torch.tensor([segments.recon_ids], device=self.device)
        labels = torch.tensor([segments.recon_labels], device=self.device)
        question_keys = torch.zeros(1, state.length, dtype=torch.bool, device=self.device)
        question_keys[:, segments.question_start:len(segments.prompt_ids)] = True
        valid = torch.ones_like(recon_ids, dtype=torch.bool)
        return reconstruction_loss(self.model, state, recon_ids, valid, labels, question_keys)

    def _score(self, segments: Segments, state: SequenceState) -> float:
        """Reconstruction loss of the current weights, leaving the state as it was."""
        length, position = state.length, state.next_position
        loss = float(self._reconstruction(segments, state)[0])
        state.truncate(length, position)
        return loss

    def _train(self, segments: Segments, ttt: TTTParams, slot: int, trace: Trace) -> Iterator[Event]:
        """Test-time training of the slot; returns the loss at the final weights if it was measured."""
        slots = torch.tensor([slot], device=self.device)
        lr = torch.tensor([ttt.lr], device=self.device)
        weight_decay = torch.tensor([ttt.weight_decay], device=self.device)
        max_norm = torch.tensor([ttt.max_grad_norm], device=self.device)
        optimizer = self.bank.optimizer
        for step in range(1, ttt.steps + 1):
            step_start = time.perf_counter()
            self.bank.zero_grad()
            with self._adapter(slot, ttt):
                state, _ = self._think(segments, ttt, thinks=True)
                loss = self._reconstruction(segments, state)[0]
            value = loss.item()
            if step == 1:
                trace.recon_loss_before = value
            if not math.isfinite(value):
                return self._abort(trace, f"non-finite reconstruction loss at step {step}")
            if ttt.stop_loss is not None and value <= ttt.stop_loss:
                trace.stopped_early = True
                trace.steps.append({"step": step, "loss": value, "grad_norm": None,
                                    "seconds": time.perf_counter() - step_start})
                yield TrainStep(step, ttt.steps, value, None, time.perf_counter() - step_start)
                return value
            loss.backward()
            del state  # frees the graph's activations before the optimiser allocates
            norm = optimizer.grad_norms(slots)
            if not torch.isfinite(norm).all():
                return self._abort(trace, f"non-finite gradient at step {step}")
            optimizer.step(slots, lr, weight_decay, max_norm, norm)
            seconds = time.perf_counter() - step_start
            trace.steps.append({"step": step, "loss": value, "grad_norm": float(norm[0]), "seconds": seconds})
            yield TrainStep(step, ttt.steps, value, float(norm[0]), seconds)
        self.bank.zero_grad()
        return None

    def _abort(self, trace: Trace, reason: str) -> None:
        """Abandon the update: the slot is not bound again, so the base model answers; the trace says why."""
        self.bank.zero_grad()
        trace.aborted = reason

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
