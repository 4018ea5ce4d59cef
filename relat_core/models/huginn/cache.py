"""Huginn's KV cache: keys and values per (block, recurrence step), with the reference's "latest-m4" lookup for
positions that stopped early, and the entries one forward call adds.

The layout follows the reference code of the project seal-rg/recurrent-pretraining (arXiv 2502.05171).

Shapes: B batch rows, T new positions in a call, K cached positions, H heads, D head size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import HuginnConfig
from .modules import KeyValueSource

KeysValues = tuple[Tensor, Tensor]


class HuginnCache:
    """Keys and values per (block, recurrence step), as the reference keeps them: one entry per prelude block, one
    per core layer and step, one per coda block (the reference's indices: prelude i at i, core layer l of step s at
    n_prelude + n_core * s + l, coda j at -1 - j).

    A position that stopped after d steps has no entries past step d - 1; a later query at step s reads it at its
    latest computed step with the same core-layer position, min(s, d - 1) (the reference's "latest-m4" lookup).
    Entries are dense (B, H, K, D) tensors per step; where a position has none, `commit` fills the slot with a copy
    of its last entry, and the lookup selects by `depth` anyway (so caches joined with other filler stay correct).
    Rows of a batch, and positions of a row, may have different depths.
    """

    def __init__(self, config: HuginnConfig):
        self.config = config
        self.prelude: list[KeysValues | None] = [None] * config.n_layers_in_prelude
        self.coda: list[KeysValues | None] = [None] * config.n_layers_in_coda
        self.core_steps: list[list[KeysValues]] = [[] for _ in range(config.n_layers_in_recurrent_block)]
        # Per core layer: every position's entry at its own last step, what a query past that step reads.
        self.core_latest: list[KeysValues | None] = [None] * config.n_layers_in_recurrent_block
        self.depth: Tensor | None = None  # (B, K) long: recurrences computed per cached position
        self.min_depth = 0  # the fewest recurrences of any cached position: below it, lookups need no selection

    @property
    def length(self) -> int:
        return 0 if self.depth is None else self.depth.shape[1]

    def get_seq_length(self) -> int:
        return self.length

    @property
    def batch_size(self) -> int | None:
        return None if self.depth is None else self.depth.shape[0]

    @property
    def num_steps_stored(self) -> int:
        return max((len(steps) for steps in self.core_steps), default=0)

    def core_lookup(self, layer: int, step: int) -> KeysValues:
        """Every cached position's keys and values for core layer `layer` as seen from recurrence step `step`."""
        latest = self.core_latest[layer]
        assert latest is not None and self.depth is not None
        if step >= len(self.core_steps[layer]):  # no cached position got this far: all at their last step
            return latest
        if step < self.min_depth:  # every cached position reached this step (always so at a fixed depth)
            return self.core_steps[layer][step]
        step_keys, step_values = self.core_steps[layer][step]
        reached = (self.depth > step)[:, None, :, None]
        return torch.where(reached, step_keys, latest[0]), torch.where(reached, step_values, latest[1])

    # -- row and position operations (relat_core.latent.SequenceState's, as on its transformers cache) --------

    def select_rows(self, rows: Tensor) -> None:
        """Keep only these batch rows (requests that left a batch)."""
        self._map(lambda t: t[rows], lambda depth: depth[rows])

    def crop(self, length: int) -> None:
        """Forget positions from `length` on."""
        self._map(lambda t: t[:, :, :length], lambda depth: depth[:, :length])

    def crop_to(self, length: int) -> None:
        """Hold at most `length` positions (a failed call appended nothing: entries are committed at its end)."""
        if self.length > length:
            self.crop(length)

    def detach_rows(self, rows: Tensor) -> None:
        """Make the cached entries of these rows ((B,) bool) constants to the gradient."""
        keep = rows[:, None, None, None]
        self._map(lambda t: torch.where(keep, t.detach(), t), lambda depth: depth)

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` positions (padding that no row can see any more)."""
        self._map(lambda t: t[:, :, count:], lambda depth: depth[:, count:])

    def row(self, index: int, first: int) -> HuginnCache:
        """A copy of row `index` from position `first` on."""
        copy = HuginnCache(self.config)
        if self.depth is not None:
            rows = torch.tensor([index], device=self.depth.device)
            copy.__dict__.update(self.__dict__)
            copy._map(lambda t: t[rows, :, first:], lambda depth: depth[rows, first:])  # new lists: no sharing
        return copy

    @classmethod
    def joined(cls, config: HuginnConfig, parts: Sequence[tuple[HuginnCache, int]], length: int) -> HuginnCache:
        """The rows of several caches (each with its batch size) as one batch, every row left-padded to `length`
        positions. Padding has the deepest depth, so that lookups never select around it (queries never see it);
        a cache that stored fewer recurrence steps than another is filled with its latest entries, which its
        positions' depths make the lookup read anyway."""
        joined = cls(config)
        filled = [cache for cache, _ in parts if cache.length]
        if not filled:
            return joined
        template = filled[0].prelude[0][0]  # (B, H, K, D)
        heads, head_dim = template.shape[1], template.shape[-1]

        def padded(pair: KeysValues | None, rows: int) -> KeysValues:
            if pair is None:
                empty = template.new_zeros(rows, heads, 0, head_dim)
                pair = (empty, empty)
            return tuple(F.pad(t, (0, 0, length - t.shape[2], 0)) for t in pair)  # type: ignore[return-value]

        def cat(pairs: list[KeysValues]) -> KeysValues:
            return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

        joined.prelude = [cat([padded(c.prelude[i], n) for c, n in parts]) for i in range(len(joined.prelude))]
        joined.coda = [cat([padded(c.coda[i], n) for c, n in parts]) for i in range(len(joined.coda))]
        for layer in range(len(joined.core_steps)):
            steps = max(len(c.core_steps[layer]) for c, _ in parts)
            joined.core_latest[layer] = cat([padded(c.core_latest[layer], n) for c, n in parts])
            joined.core_steps[layer] = [
                cat([padded(c.core_steps[layer][step] if step < len(c.core_steps[layer]) else c.core_latest[layer], n)
                     for c, n in parts]) for step in range(steps)]
        deepest = max(int(c.depth.max()) for c in filled)
        depths = []
        for cache, rows in parts:
            depth = cache.depth if cache.depth is not None else template.new_zeros(rows, 0, dtype=torch.long)
            depths.append(F.pad(depth, (length - depth.shape[1], 0), value=deepest))
        joined._set_depth(torch.cat(depths))
        return joined

    def _map(self, entry: Callable[[Tensor], Tensor], depth: Callable[[Tensor], Tensor]) -> None:
        if self.depth is None:
            return

        def both(pair: KeysValues | None) -> KeysValues | None:
            return None if pair is None else (entry(pair[0]), entry(pair[1]))

        self.prelude = [both(pair) for pair in self.prelude]
        self.coda = [both(pair) for pair in self.coda]
        self.core_latest = [both(pair) for pair in self.core_latest]
        self.core_steps = [[both(pair) for pair in steps] for steps in self.core_steps]  # type: ignore[misc]
        self._set_depth(depth(self.depth))

    def commit(self, chunk: _ChunkEntries, chunk_depth: Tensor) -> None:
        """Append a call's new positions (their entries and depths, (B, T)) once the call is done: during it,
        lookups of the past must see the cache as it was."""
        if self.depth is not None and self.depth.shape[0] != chunk_depth.shape[0]:
            raise ValueError(f"cache holds {self.depth.shape[0]} rows, the call had {chunk_depth.shape[0]}")

        def append(old: KeysValues | None, new: KeysValues) -> KeysValues:
            if old is None:
                return new
            return torch.cat([old[0], new[0]], dim=2), torch.cat([old[1], new[1]], dim=2)

        for index, new in enumerate(chunk.prelude):
            assert new is not None
            self.prelude[index] = append(self.prelude[index], new)
        for index, new in enumerate(chunk.coda):
            assert new is not None
            self.coda[index] = append(self.coda[index], new)
        for layer, new_steps in enumerate(chunk.core_steps):
            new_latest, old_latest = chunk.core_latest[layer], self.core_latest[layer]
            assert new_latest is not None
            old_steps = self.core_steps[layer]
            merged = []
            for step in range(max(len(old_steps), len(new_steps))):
                # Filler where a side never reached this step: its latest entry, which the lookup reads anyway.
                old = old_steps[step] if step < len(old_steps) else old_latest
                merged.append(append(old, new_steps[step] if step < len(new_steps) else new_latest))
            self.core_steps[layer] = merged
            self.core_latest[layer] = append(old_latest, new_latest)
        self._set_depth(chunk_depth if self.depth is None else torch.cat([self.depth, chunk_depth], dim=1))

    def _set_depth(self, depth: Tensor) -> None:
        self.depth = depth
        self.min_depth = int(depth.min()) if depth.numel() else 0


class _ChunkEntries:
    """The new positions' keys and values during one forward call, and the attention sources built on them."""

    def __init__(self, config: HuginnConfig, cache: HuginnCache | None):
        self.cache = cache
        self.prelude: list[KeysValues | None] = [None] * config.n_layers_in_prelude
        self.coda: list[KeysValues | None] = [None] * config.n_layers_in_coda
        self.core_steps: list[list[KeysValues]] = [[] for _ in range(config.n_layers_in_recurrent_block)]
        self.core_latest: list[KeysValues | None] = [None] * config.n_layers_in_recurrent_block

    def _with_past(self, past: KeysValues | None, keys: Tensor, values: Tensor) -> KeysValues:
        if past is None or self.cache is None or self.cache.length == 0:
            return keys, values
        return torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)

    def prelude_source(self, index: int) -> KeyValueSource:
        def source(keys: Tensor, values: Tensor) -> KeysValues:
            self.prelude[index] = (keys, values)
            return self._with_past(self.cache.prelude[index] if self.cache is not None else None, keys, values)

        return source

    def coda_source(self, index: int, store: bool) -> KeyValueSource:
        """store False: an exit check's look at the coda, whose entries are not the position's final ones."""

        def source(keys: Tensor, values: Tensor) -> KeysValues:
            if store:
                self.coda[index] = (keys, values)
            return self._with_past(self.cache.coda[index] if self.cache is not None else None, keys, values)

        return source

    def core_source(self, layer: int, step: int, active: Tensor) -> KeyValueSource:
        """active: (B, T) bool, the new positions still iterating at this step; the others keep (and are read at)
        their last step's entries, like exited positions in the cache."""

        def source(keys: Tensor, values: Tensor) -> KeysValues:
            latest = self.core_latest[layer]
            if latest is not None:  # every position runs step 0, so only later steps can have stopped ones
                keep = active[:, None, :, None]
                keys, values = torch.where(keep, keys, latest[0]), torch.where(keep, values, latest[1])
            self.core_latest[layer] = (keys, values)
            if self.cache is not None:  # without a cache nobody reads older steps again
                self.core_steps[layer].append((keys, values))
            past = self.cache.core_lookup(layer, step) if self.cache is not None and self.cache.length else None
            return self._with_past(past, keys, values)

        return source
