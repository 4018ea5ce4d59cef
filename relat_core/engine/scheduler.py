"""The engine's scheduler: `direct`, `latent` (open loop) and `relat` (closed loop), many requests batched together.

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

As in vLLM v1, the scheduler only decides which rows run which phase this step; each phase runs its rows and
returns their events: gating.py (`Gate`: whether a request trains at all), training.py (`Trainer`), thinking.py
(`Thinker`), answering.py (`Answerer`, which owns the decoding batch). The rows are rows.py's plain dataclasses;
what the phases share is context.py's `EngineContext`, which the engine is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch

from ..adapter_cache import AdapterCache
from ..agents import TEAMS, AgentPrompts, resolve_answer_format, with_format
from ..chat import normalise_messages, question_index, raw_segments
from ..loading import LoadedModel
from ..models.huginn import DEFAULT_EXIT_THRESHOLDS, RowRecurrence
from ..params import HUGINN_ATTENTION_TARGETS, InvalidParameter, TTTParams
from . import completion, gating
from .answering import Answerer
from .context import EngineContext
from .defaults import DEFAULT_ADAPTER_SEED, default_ttt_params, recurrence_defaults
from .events import EngineBusy, Event, Failed, Finished, Request, Result, Trace
from .rows import _Sequence
from .thinking import Thinker
from .training import Trainer

log = logging.getLogger("relat_core")


class Engine(EngineContext):
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
        super().__init__(loaded, max_rank, num_slots, agent_prompts, adapter_cache)
        if defaults is None:
            defaults = default_ttt_params(self.num_parameters)
            if self.recurrent:
                defaults = defaults.replace(targets=HUGINN_ATTENTION_TARGETS, **recurrence_defaults(self.model))
        self.defaults = defaults
        self._sequences: dict[str, _Sequence] = {}  # in arrival order
        # The phases, each called with the rows it runs this step.
        self.trainer = Trainer(self)
        self.gate = gating.Gate(self, self.trainer)
        self.answerer = Answerer(self, self._sequences, self._fail, self.gate.settle)
        self.thinker = Thinker(self, self.answerer)

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

        Cheap and thread-safe (no tokenizer, no tensors; a structured output's grammar is compiled once and cached),
        so a server can call it before queueing a request.
        """
        completion.check_request(request, self.vocabulary)  # a raw prompt, prompt logprobs, continuations
        messages = normalise_messages(request.messages) if request.prompt is None else []
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
        if any(token >= self.vocabulary for token in request.sampling.logit_bias):
            raise InvalidParameter("logit_bias", f"logit_bias keys must be token ids below {self.vocabulary} for "
                                   f"{self.name}, got {max(request.sampling.logit_bias)}")
        if ttt.logprob_shift and not request.sampling.logprobs:
            raise InvalidParameter("logprob_shift", "logprob_shift needs logprobs: true (it adds each answer token's "
                                   "logprob under the base model to its logprobs)")
        if request.tools and not self.chat.supports_tools:
            raise InvalidParameter("tools", f"the chat template of {self.name} has no tool support: it does not write "
                                   "tools into the prompt")
        if request.tools and ttt.agents != "single":
            raise InvalidParameter("tools", "tools are for single-agent requests: each agent writes its own prompt")
        if request.tools and request.prompt is not None:
            raise InvalidParameter("tools", "tools are rendered by the chat template: a raw prompt has none")
        if request.sampling.structured_output is not None:
            self.grammars.compile(request.sampling.structured_output)  # a 400 before the request queues
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
        # Latent agents always share a working memory (of their turns alone when latent_steps is 0).
        thinks = ttt.method != "direct" and (ttt.latent_steps > 0 or bool(team))
        if request.prompt is not None:  # a raw prompt: read as it is (check refused agents and answer formats)
            answer_format = "text"
            segments = raw_segments(self.tokenizer, request.prompt, ttt.reconstruction_instruction, ttt.follow_up,
                                    latent=thinks)
        else:
            asked = question_index(messages)
            question = messages[asked]["content"]
            answer_format = resolve_answer_format(ttt, question)
            if not team and answer_format != "text":
                messages[asked] = {"role": "user", "content": with_format(question, answer_format, self.agent_prompts)}
            segments = self.chat.segments(messages, ttt.reconstruction_instruction, ttt.follow_up, latent=thinks,
                                          tools=request.tools)
        forced = None
        if request.continuations is not None:  # scored as the answers: n of them, each forced to its end
            forced = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in request.continuations]
            sampling = completion.scored_sampling(sampling, len(forced))
        # Each option as it applies to this request (the trace reports what ran, not what was asked).
        from_thought = thinks and not (ttt.method == "relat" and ttt.answer_context == "question")
        trace = Trace(ttt.method, ttt.latent_steps if thinks else 0, adapter_during_answer=False,
                      answer_context="thought" if from_thought else "question",
                      guidance=ttt.guidance if ttt.guided else 1.0,
                      contrastive_eta=ttt.contrastive_eta if ttt.trains else 0.0,
                      agents=ttt.agents, answer_format=answer_format,
                      options=ttt.as_applied())
        sequence = _Sequence(request_id, segments, ttt, sampling, trace, time.perf_counter(),
                             return_adapter=request.return_adapter, messages=messages, team=team, forced=forced,
                             cache_partition=request.cache_partition)
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
            if gating.applies(ttt, sampling, scored=forced is not None):
                self.gate.start(sequence, slot)
            else:
                self.trainer.start(sequence, slot)
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

    def abort_request(self, request_id: str) -> None:
        """Drop a request between steps (cancelled, past its deadline); its slot is free for the next one at once.
        Unknown or finished ids are ignored."""
        sequence = self._sequences.pop(request_id, None)
        if sequence is None:
            return
        if sequence.slot is not None:
            self.bank.release(sequence.slot)
        if sequence.phase == "decode":
            self.answerer.leave([sequence, *sequence.siblings])

    def step(self) -> list[tuple[str, Event]]:
        """One unit of work: a training step of every request still training, unless the answering requests still
        have time owed from the last one (`decode_share`); one agent (or the whole thought) of every thinking
        request; then one token of every answering request. Returns
        the events produced, in order; one token per step keeps the answers streaming token by token."""
        events: list[tuple[str, Event]] = []
        gated = [s for s in self._sequences.values() if s.phase == "gate"]
        if gated:
            events += self._isolated(gated, self.gate.run)
        training = [s for s in self._sequences.values() if s.phase == "train"]
        if training and (self.answerer.decoding is None or self._decode_credit <= 0):
            start = time.perf_counter()
            events += self._isolated(training, self.trainer.run)
            self._decode_credit = (time.perf_counter() - start) * self.decode_share / (1 - self.decode_share)
        thinking = [s for s in self._sequences.values() if s.phase == "think"]
        if thinking:
            events += self._isolated(thinking, self.thinker.run)
        if self.answerer.decoding is not None:
            start = time.perf_counter()
            events += self.answerer.run()
            self._decode_credit -= time.perf_counter() - start
        if self.answerer.decoding is None:
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

    def _fail(self, sequence: _Sequence, error: Exception) -> tuple[str, Event]:
        """End one request with its error; the others go on."""
        log.error("request %s failed: %r", sequence.request_id, error)
        self.abort_request(sequence.request_id)
        return sequence.request_id, Failed(error)

