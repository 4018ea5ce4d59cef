"""The training phase of `relat` (ReLAT, arXiv 2606.06252): every request still training takes one step per engine
step, all of them as one batched forward and backward pass, each row through its own adapter slot.

A step rebuilds each row's whole latent thought from an empty cache, scores the reconstruction of its question
(masked cross-entropy), backpropagates the losses into the slots and takes one clipped AdamW step per slot
(relat_core/lora.py's slot optimiser). The adapter cache (relat_core/adapter_cache.py) spares the whole phase: a
hit loads the weights a request with the same training got, a miss caches its own once training ends.
"""

from __future__ import annotations

import math
import time

import torch

from ..adapter_cache import CachedAdapter, training_key
from ..latent import SequenceState
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
        return training_key(self.context.name, pieces, segments.recon_ids, segments.recon_labels, sequence.ttt, seed)

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
            with context._bind(rows, [True] * len(rows)):
                state, _ = self._think(rows)
                losses = context._reconstruction(rows, state)
            values = losses.tolist()
            stepping = [i for i, (row, value) in enumerate(zip(rows, values, strict=True))
                        if math.isfinite(value) and (row.ttt.stop_loss is None or value > row.ttt.stop_loss)]
            norms: list[float | None] = [None] * len(rows)
            if stepping:
                losses[stepping].sum().backward()
                del state, losses  # frees the graph's activations before the optimiser allocates
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
        finally:
            context.bank.zero_grad()
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
