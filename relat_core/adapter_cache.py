"""The adapter cache: train once, answer many.

Test-time training is most of a relat request's time, and traffic repeats itself: the same question again, an
evaluation sampling several answers, a client retrying after a dropped connection. A trained adapter is a function
of what the training saw and nothing else, so the engine keys it by a hash of exactly that (`training_key`), and
a request with the same key gets the adapter copied into its slot instead of training: it goes straight to its
thought with the final weights and answers as it would have after training (the weights are the same bytes).

What the key holds: the model, the token ids the training reads (the prompt with its question marked, every latent
agent's turn, the reconstruction target), every TTT option that shapes the training or its latent rollout (the
training objective among them, and entropy_tokens where the objective is "entropy"), and the adapter's seed.
What it leaves out: what only shapes the answer (sampling, max_tokens, stop; guidance, the answer's context, the
adapter while answering, the final thought's contrastive feedback) and the per-request switch itself.
One more thing goes in that shapes nothing: the request's cache partition (Request.cache_partition), an opaque
string by which a caller keeps apart requests that must not learn of each other's training (a server's tenants).

Entries are bounded by count and by bytes, evicted least recently used first; a size of 0 turns the cache off.
Only an adapter whose training finished is stored: one abandoned by the non-finite guard, or from a request that
failed or was cancelled while training, never reaches `put`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch

from .params import TTTParams

# TTT options that act only after training (on the final thought or the answer) or before it (the gate, which
# decides whether it runs), and the cache switch itself.
NOT_IN_KEY: frozenset[str] = frozenset({"guidance", "answer_context", "adapter_during_answer", "contrastive_eta",
                                        "cache", "gate", "gate_threshold", "draft_tokens", "logprob_shift"})


def training_key(model: str, pieces: list[tuple[list[int], int, int]], recon_ids: list[int],
                 recon_labels: list[int], ttt: TTTParams, seed: int, partition: str = "") -> str:
    """SHA-256 of everything that determines a request's trained adapter. pieces: (token ids, question start,
    latent steps) of each part of the latent thought the training runs through. partition: the request's
    Request.cache_partition, opaque here; requests in different partitions never share an entry, whatever else
    they share."""
    options = {name: value for name, value in asdict(ttt).items() if name not in NOT_IN_KEY}
    if ttt.objective != "entropy":
        del options["entropy_tokens"]  # the entropy objective's draft length shapes no other training
    options["targets"] = sorted(ttt.targets)  # the same layers in another order are the same adapter
    text = json.dumps({"model": model, "pieces": pieces, "recon_ids": recon_ids, "recon_labels": recon_labels,
                       "options": options, "seed": seed, "partition": partition}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CachedAdapter:
    """A trained adapter (each adapted layer's A[:rank] and B[:, :rank], None for layers it does not adapt) and
    what its training recorded, which a hit's trace reports as its own."""

    weights: list[tuple[torch.Tensor, torch.Tensor] | None]
    steps: list[dict]  # the trace's training steps: {step, loss, grad_norm, seconds}
    steps_taken: int
    recon_loss_before: float | None
    stopped_early: bool
    loss_now: float | None  # the loss at the final weights, when training measured it (an early stop)
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.steps = copy.deepcopy(self.steps)  # the trace it came from lives on in its own response
        self.nbytes = sum(t.numel() * t.element_size() for pair in self.weights if pair for t in pair)

    def records(self) -> list[dict]:
        return copy.deepcopy(self.steps)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


@dataclass
class AdapterCache:
    """Least-recently-used trained adapters, at most `max_entries` of them and `max_bytes` in all."""

    max_entries: int
    max_bytes: int
    stats: CacheStats = field(default_factory=CacheStats)
    _entries: OrderedDict[str, CachedAdapter] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def get(self, key: str) -> CachedAdapter | None:
        """The entry, now the most recently used; counts a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, key: str, entry: CachedAdapter) -> None:
        """Store an entry, evicting the least recently used ones past the bounds; one larger than `max_bytes` alone
        is not stored."""
        if not self.enabled or entry.nbytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.stats.bytes -= old.nbytes
        self._entries[key] = entry
        self.stats.bytes += entry.nbytes
        while len(self._entries) > self.max_entries or self.stats.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.stats.bytes -= evicted.nbytes
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
