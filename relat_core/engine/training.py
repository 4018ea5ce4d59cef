"""The training phase of `relat` (ReLAT, arXiv 2606.06252): every request still training takes one step per engine
step, all of them as one batched forward and backward pass, each row through its own adapter slot.

A step rebuilds each row's whole latent thought from an empty cache, scores the reconstruction of its question
(masked cross-entropy), backpropagates the losses into the slots and takes one clipped AdamW step per slot
(relat_core/lora.py's slot optimiser). A request may train on another objective instead (`objective`: the
paper's controls, without a thought: relat_core/engine/objectives.py); the rows of each objective are a batch of
their own within the same step, and their losses take the same backward pass and optimiser step. The adapter cache
(relat_core/adapter_cache.py) spares the whole phase: a hit loads the weights a request with the same training
got, a miss caches its own once training ends.
"""

from __future__ import annotations

import math
import time

import torch

from ..adapter_cache import CachedAdapter, training_key
from ..latent import SequenceState
from . import objectives
from .context import EngineContext
from .defaults import DEFAULT_ADAPTER_SEED
from .events import Event, TrainStep
from .rows import _Sequence


class Trainer:
    """Trains the adapters of the requests in the train phase; a row leaves the phase ("think") when it has taken
    its steps, stopped early, or abandoned its update."""

    def __init__(self, context: EngineContext):
        self.context = context

    def start(self, sequence: _Sequence, slot: int) -> None:
        """A request that trains joins with its leased slot: its adapter is fresh (B = 0, drawn from the request's
        seed), or loaded from the adapter cache, in which case it skips training. The slot goes back if this
        fails (the request never joined: nothing else would give it back)."""
        context, ttt, sampling = self.context, sequence.ttt, sequence.sampling
        seed = sampling.seed if sampling.seed is not None else DEFAULT_ADAPTER_SEED
        key = self._training_key(sequence, seed) if ttt.cache and context.adapter_cache.enabled else None
        cached = context.adapter_cache.get(key) if key is not None else None
        try:
            if cached is None:
                context.bank.reset(slot, ttt.rank, ttt.targets, torch.Generator(context.device).manual_seed(seed))
            else:
                context.bank.load(slot, cached.weights)
        except BaseException:
            context.bank.release(slot)  # the request never joined: nothing else would give its slot back
            raise
        sequence.slot, sequence.phase = slot, "train"
        sequence.trace.objective = ttt.objective
        if key is not None:
            sequence.trace.cache = "miss" if cached is None else "hit"
        if cached is None:
            sequence.cache_key = key
        else:
            self._trained_from_cache(sequence, cached)

    def _training_key(self, sequence: _Sequence, seed: int) -> str:
        """The adapter cache's key: what the training of this request reads, and how it trains."""
        pieces = [(piece.token_ids, piece.question_start, piece.latent_steps) for piece in sequence.pieces]
        segments = sequence.segments
        return training_key(self.context.name, pieces, segments.recon_ids, segments.recon_labels, sequence.ttt, seed,
                            sequence.cache_partition)

    def _trained_from_cache(self, sequence: _Sequence, cached: CachedAdapter) -> None:
        """A hit: the request skips training, its trace holding what the adapter's own training recorded."""
        sequence.step = cached.steps_taken
        sequence.trace.steps = cached.records()
        sequence.trace.recon_loss_before = cached.recon_loss_before
        sequence.trace.stopped_early = cached.stopped_early
        sequence.loss_now = cached.loss_now
        self._end_training(sequence, adapted=True)

    def run(self, rows: list[_Sequence]) -> list[tuple[str, Event]]:
        """One training step of every row as one batched forward and backward pass; each row's loss reaches only
        its own slot, so its update is exactly the one it would get alone. Rows that stop or fail leave training.
        Nothing about a row changes until the whole step has succeeded (a failed batch is re-run row by row)."""
        context = self.context
        start = time.perf_counter()
        optimizer = context.bank.optimizer
        context.bank.zero_grad()
        try:
            # Objective "entropy": the draft of a row at its first step (base model, no graph), kept once the step
            # has succeeded.
            drafts = [row.draft for row in rows]
            starting = [i for i, row in enumerate(rows) if objectives.needs_draft(row)]
            if starting:
                for i, draft in zip(starting, objectives.greedy_drafts(context, [rows[i] for i in starting]),
                                    strict=True):
                    drafts[i] = draft
            losses = self._losses(rows, drafts)
            values = losses.tolist()
            stepping = [i for i, (row, value) in enumerate(zip(rows, values, strict=True))
                        if math.isfinite(value) and (row.ttt.stop_loss is None or value > row.ttt.stop_loss)]
            norms: list[float | None] = [None] * len(rows)
            final: dict[int, float] = {}
            if stepping:
                losses[stepping].sum().backward()
                del losses  # frees the graph's activations before the optimiser allocates
                slots = torch.tensor([rows[i].slot for i in stepping], device=context.device)
                slot_norms = optimizer.grad_norms(slots)
                finite = torch.isfinite(slot_norms)
                if bool(finite.any()):
                    def column(name: str) -> torch.Tensor:
                        per_row = [getattr(rows[i].ttt, name) for i in stepping]
                        return torch.tensor(per_row, device=context.device)[finite]

                    optimizer.step(slots[finite], column("lr"), column("weight_decay"), column("max_grad_norm"),
                                   slot_norms[finite])
                for i, norm in zip(stepping, slot_norms.tolist(), strict=True):
                    norms[i] = norm
                final = self._final_losses(rows, drafts, norms)
        finally:
            context.bank.zero_grad()
        seconds = time.perf_counter() - start
        events: list[tuple[str, Event]] = []
        for index, (row, value, norm) in enumerate(zip(rows, values, norms, strict=True)):
            row.step += 1
            row.draft = drafts[index]
            if row.step == 1:
                row.trace.recon_loss_before = value
            if not math.isfinite(value):
                self._abort_update(row, f"non-finite {row.ttt.objective} loss at step {row.step}")
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
                    if index in final:  # another objective than reconstruction: measured above
                        row.loss_now = final[index]
                    self._end_training(row, adapted=True)
        return events

    def _losses(self, rows: list[_Sequence], drafts: list[list[int] | None]) -> torch.Tensor:
        """Each row's loss under its objective, (B,), with its graph: the rows of one objective run as one batch,
        each row through its own slot. Reconstruction: the whole latent thought, then the question rebuilt from
        it; the others: relat_core/engine/objectives.py."""
        groups: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(row.ttt.objective, []).append(index)
        parts = []
        for objective, indices in groups.items():
            group = [rows[i] for i in indices]
            with self.context._bind(group, [True] * len(group)):
                if objective == "reconstruction":
                    state, _ = self._think(group)
                    parts.append(self.context._reconstruction(group, state))
                else:
                    parts.append(objectives.losses(self.context, objective, group, [drafts[i] for i in indices]))
        if len(parts) == 1:
            return parts[0]
        order = torch.tensor([i for indices in groups.values() for i in indices], device=self.context.device)
        return torch.cat(parts)[order.argsort()]

    def _final_losses(self, rows: list[_Sequence], drafts: list[list[int] | None], norms: list[float | None]
                      ) -> dict[int, float]:
        """The loss at the final weights of the rows whose training this step has ended (a finite update, its last
        step) under another objective than reconstruction, by row index; one forward without a graph. (The
        reconstruction's is scored in the think phase, on the thought it runs with the final weights.)"""
        ending = [i for i, (row, norm) in enumerate(zip(rows, norms, strict=True))
                  if row.ttt.objective != "reconstruction" and norm is not None and math.isfinite(norm)
                  and row.step + 1 >= row.ttt.steps]
        if not ending:
            return {}
        with torch.no_grad():
            return {i: value for i, value in zip(ending, self._losses([rows[i] for i in ending],
                                                                      [drafts[i] for i in ending]).tolist(),
                                                  strict=True)}

    def _think(self, rows: list[_Sequence]) -> tuple[SequenceState, torch.Tensor]:
        """Each row's whole latent thought from an empty cache (its prompt and latent steps, or every agent's turn
        and latent steps, in one pass: training backpropagates through all of it); returns the state and the last
        hidden state of each row, (B, d)."""
        context = self.context
        state = SequenceState.empty(context.model, len(rows), context.device)
        hidden = context._read_pieces(state, context._no_hidden(len(rows)), [row.pieces for row in rows],
                                      [row.ttt for row in rows])
        return state, hidden

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
            self.context.adapter_cache.put(row.cache_key, CachedAdapter(
                self.context.bank.snapshot(row.slot, row.ttt.rank, row.ttt.targets), row.trace.steps, row.step,
                row.trace.recon_loss_before, row.trace.stopped_early, row.loss_now))
        row.cache_key = None
        row.adapted = adapted
        row.trace.adapter_during_answer = row.answers_with_adapter
        row.phase = "think"
