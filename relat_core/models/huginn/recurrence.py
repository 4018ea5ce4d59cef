"""Huginn's recurrence options per batch row and its adaptive exits: a position stops iterating once its criterion
fires (KL between successive next-token distributions, relative latent change, or argmax stability).

The criteria and their "auto" thresholds are the reference's (Geiping et al., arXiv 2502.05171; the project
seal-rg/recurrent-pretraining). Shapes: B batch rows, T new positions in a call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_RECURRENCE = 1 << 20  # "no truncation": more recurrences than any call runs
EXIT_CRITERIA = ("kl", "latent-diff", "argmax-stability")
# The reference's "auto" thresholds: KL between successive next-token distributions, relative change of the
# latent state, and the number of successive steps with the same argmax.
DEFAULT_EXIT_THRESHOLDS: dict[str, float] = {"kl": 1e-3, "latent-diff": 0.03, "argmax-stability": 5}


# -- adaptive exit ------------------------------------------------------------------------------------------------


class _ExitCriterion:
    """Per-position exit test after each recurrence step; `logits` runs the coda and head only if needed."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def start(self, state: Tensor) -> None:
        raise NotImplementedError

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        """Returns (B, T) bool, where the criterion fires; tracked values change only where `active`."""
        raise NotImplementedError


class _KLExit(_ExitCriterion):
    """KL(previous || current) of the next-token distributions below the threshold (the first step compares
    against the uniform distribution, as the reference does)."""

    def start(self, state: Tensor) -> None:
        self.previous: Tensor | None = None

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        log_probs = F.log_softmax(logits().float(), dim=-1)
        if self.previous is None:
            divergence = -math.log(log_probs.shape[-1]) - log_probs.mean(-1)
            self.previous = log_probs
        else:
            divergence = (self.previous.exp() * (self.previous - log_probs)).sum(-1)
            self.previous = torch.where(active[..., None], log_probs, self.previous)
        return divergence < self.threshold


class _LatentDiffExit(_ExitCriterion):
    """|s_k - s_{k-1}| / |s_k| below the threshold (the state before the final norm)."""

    def start(self, state: Tensor) -> None:
        self.previous = state.float()

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        current = state.float()
        change = (current - self.previous).norm(dim=-1) / current.norm(dim=-1).clamp(min=1e-12)
        self.previous = torch.where(active[..., None], current, self.previous)
        return change < self.threshold


class _ArgmaxStabilityExit(_ExitCriterion):
    """The same argmax for `threshold` successive steps after the one where it first appeared."""

    def start(self, state: Tensor) -> None:
        self.previous: Tensor | None = None
        self.stable_for = torch.zeros(state.shape[:2], dtype=torch.long, device=state.device)

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        current = logits().argmax(dim=-1)
        if self.previous is not None:
            stable_for = torch.where(current == self.previous, self.stable_for + 1, 0)
            self.stable_for = torch.where(active, stable_for, self.stable_for)
            current = torch.where(active, current, self.previous)
        self.previous = current
        return self.stable_for >= self.threshold


def make_exit_criterion(name: str | None, threshold: float | str | None = None) -> _ExitCriterion | None:
    """None or "none": no adaptive exit. threshold None or "auto": the reference's default for the criterion."""
    if name in (None, "none"):
        return None
    classes = {"kl": _KLExit, "latent-diff": _LatentDiffExit, "argmax-stability": _ArgmaxStabilityExit}
    if name not in classes:
        raise ValueError(f"unknown exit_criterion {name!r}; use one of none, {', '.join(EXIT_CRITERIA)}")
    value = DEFAULT_EXIT_THRESHOLDS[name] if threshold in (None, "auto") else float(threshold)  # type: ignore[arg-type]
    return classes[name](value)


# -- per-row recurrence -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowRecurrence:
    """How one batch row iterates: a request's depth options, resolved (relat_core.params.TTTParams)."""

    num_steps: int
    init_scale: float = 1.0
    exit_criterion: str | None = None  # None or "none": a fixed depth
    exit_threshold: float | None = None  # None: the criterion's default
    backprop_depth: int | None = None  # gradient through the last this many recurrences; None: all of them
    # The random initial state of the position at index p is drawn from a generator seeded by (noise_seed, p): the
    # same state whatever the batch, its padding or the chunk the position arrives in (batched equals alone, and a
    # thought re-run after training starts from the states it was trained on).
    noise_seed: int = 0


@dataclass
class Recurrence:
    """Per-row recurrence for the forwards run while it is bound (`HuginnForCausalLM.recurring`), the way the
    engine's adapter slots are bound; `used` receives the recurrences each position of the last forward ran."""

    rows: list[RowRecurrence]
    # Whether the rows' exit criteria apply. The engine binds them off around a training step, whose forwards run
    # every position its full num_steps even where they need no graph (a truncated thought's first latent steps).
    exits: bool = True
    used: Tensor | None = None  # (B, T) long


def _position_seed(noise_seed: int, position: int) -> int:
    """A generator seed for one position of one request: distinct positions and seeds give distinct streams."""
    return (noise_seed * 1_000_003 + position) % (2**63)


class _RowExits:
    """Each row's exit criterion (rows may differ): the criteria in use, each fired only on its own rows; the
    coda's prediction, when a criterion reads it, is computed once per step for all."""

    def __init__(self, rows: Sequence[tuple[str | None, float | str | None]], device: torch.device):
        self.groups: list[tuple[_ExitCriterion, Tensor]] = []
        for key in dict.fromkeys(rows):
            criterion = make_exit_criterion(*key)
            if criterion is not None:
                mask = torch.tensor([row == key for row in rows], device=device)
                self.groups.append((criterion, mask))

    def start(self, state: Tensor) -> None:
        for criterion, _ in self.groups:
            criterion.start(state)

    def update(self, state: Tensor, active: Tensor, logits: Callable[[], Tensor]) -> Tensor:
        computed: list[Tensor] = []

        def once() -> Tensor:
            if not computed:
                computed.append(logits())
            return computed[0]

        fired = torch.zeros_like(active)
        for criterion, mask in self.groups:
            fired |= mask[:, None] & criterion.update(state, active, once)
        return fired
