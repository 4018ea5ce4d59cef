"""The statistics of the report (relat_eval.report): pure functions over records, no plotting and no files.

Why these: the data sets are small (tens to hundreds of items per task), so an accuracy is shown with its 95%
Wilson score interval, which stays inside [0, 1] and keeps its coverage near 0% and 100%, where the normal
approximation does not (Brown, Cai & DasGupta 2001, "Interval Estimation for a Binomial Proportion"). Two variants
are compared item by item on the same items, with the exact two-sided sign test on the items where exactly one of
them is right, because on 40 items a difference of two or three is noise, and unpaired intervals would hide how
much two variants agree. A method can also change many replies and few scores, hence the count of replies that
differ from the baseline's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Item = tuple[str, int]  # (data, index): what pairs two variants' records


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of `correct` successes out of `n` (95% with z = 1.96). With no items nothing is
    known: (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    share = correct / n
    spread = z * z / n
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / n + spread / (4 * n)) / (1 + spread)
    # At 0 or n the bound equals the share up to rounding: clamp the -1e-17.
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test on the discordant pairs (ties were dropped before): the chance under "neither is
    better" (each discordant pair a fair coin) of a split at least this uneven."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)  # at wins == losses the two tails overlap in the middle term


@dataclass(frozen=True)
class Paired:
    """A variant against a baseline on the items both have answered."""

    shared: int
    wins: int  # right where the baseline is wrong
    losses: int  # wrong where the baseline is right
    differ: int  # replies other than the baseline's (whitespace at the ends aside)

    @property
    def p(self) -> float:
        return sign_test(self.wins, self.losses)


def by_item(records: Iterable[dict[str, Any]], variant: str) -> dict[Item, dict[str, Any]]:
    """A variant's records keyed by (data, index); a later record of the same item replaces an earlier one."""
    return {(r["data"], r["index"]): r for r in records if r["variant"] == variant}


def _reply(record: dict[str, Any]) -> str:
    return (record.get("reply") or "").strip()  # a failed request has no reply


def pair(results: dict[Item, dict[str, Any]], baseline: dict[Item, dict[str, Any]]) -> Paired:
    """Wins, losses and differing replies of `results` against `baseline`, on the items both hold."""
    shared = results.keys() & baseline.keys()
    return Paired(
        len(shared),
        sum(bool(results[k].get("correct")) and not baseline[k].get("correct") for k in shared),
        sum(bool(baseline[k].get("correct")) and not results[k].get("correct") for k in shared),
        sum(_reply(results[k]) != _reply(baseline[k]) for k in shared),
    )


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values present (None for none), since fields missing from a record are null, not zero."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
