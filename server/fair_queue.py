"""Fair shares between tenants: one waiting queue per tenant, admission by turns, per-tenant limits.

The runner (server/runner.py) holds one FairQueue under its lock. What it decides:

- **Admission.** When the engine's batch has room, the next request comes from the tenant with the fewest requests
  running, ties going to the tenant admitted longest ago (round-robin by request). A tenant that floods the server
  therefore cannot make another wait behind its whole queue: a tenant with a request waiting gets the next place
  that frees ahead of every tenant that runs more than it does.
- **Shares of max_concurrency.** A tenant with its own max_concurrency (keys file) never runs more than that. One
  without it may use every place of the batch (but the reserve, below) while nobody else waits: the share is
  work-conserving, because a running request cannot be taken back (aborting it would throw its training away), and
  places left idle while one tenant waits would only slow everyone. When several tenants wait, places go by the rule
  above, so running counts even out as requests finish: with k tenants busy, each converges to max_concurrency / k.
- **The reserve.** Work-conserving alone, a flood takes every place while the others are idle, and a request of
  another tenant then waits for one of the flood's to finish, about one service time in a full batch, before it can
  start: bench/RESULTS.md section 21 measured B's p95 at 4.25x alone for that. So when the server has more than one
  tenant, a tenant that already runs a request may not take the last `tenant_reserve` places (settings:
  `--tenant-reserve`, default 1 with several tenants and max_concurrency >= 2); they stay free for a tenant that
  runs none, which is admitted at the engine's next step without waiting for anyone to finish. They are held only
  while some known tenant runs none (at most one place each): when every tenant runs, nobody could use them. The
  cost is throughput: a flood while the other tenants are idle runs in max_concurrency - tenant_reserve places, not
  all of them (with 4 places and a reserve of 1, three quarters of the batch; what that cost in answers a second,
  and what it bought: bench/RESULTS.md section 21.1). A running request cannot be taken back (its training would be
  thrown away), so a place kept free is the only way to admit a newcomer at once. One tenant alone (a keyless
  server, `--api-key` only) keeps none: the settings give it a reserve of 0.
- **Queue limits.** A tenant's own max_queue bounds the requests it has waiting beyond its running share, as the
  server's max_queue bounds them all (capacity = running share + queue). The server's bound still holds. A tenant
  without its own max_queue may use the server's whole queue, less the places kept for the other tenants that have
  nothing queued: one each, at most half the queue. So a flooding tenant fills at most that much, and a tenant
  that sends steadily always finds a place. One tenant alone (a keyless server, `--api-key` only) keeps none.
- **Requests per minute.** A token bucket per tenant that holds a minute's requests and refills at
  requests_per_minute / 60 a second: at most that many in any minute. Only accepted requests take a token.

Every refusal is a 429 with Retry-After: seconds until a token for the rate limit; for a full queue, the runner's
estimate of when a place frees.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .tenants import Tenant

if TYPE_CHECKING:
    from .runner import Job


@dataclass
class Refusal:
    """Why a request is refused (a 429): the metric's reason, the client's message and when to retry."""

    reason: str  # "rate_limited", "tenant_queue_full" or "queue_full" (relat_tenant_rejected's label)
    message: str
    retry_after: int


@dataclass
class _TenantQueue:
    tenant: Tenant
    waiting: deque[Job] = field(default_factory=deque)
    tokens: float = 0.0  # the rate limit's bucket; a full one when the tenant is first seen
    refilled: float = 0.0  # time.monotonic() of the last refill
    last_admitted: int = -1  # the admission number of its last admitted request: older goes first on a tie

    def refill(self, now: float) -> None:
        rate = self.tenant.requests_per_minute
        if rate is None:
            return
        self.tokens = min(float(rate), self.tokens + (now - self.refilled) * rate / 60.0)
        self.refilled = now


class FairQueue:
    """The waiting requests of every tenant, and the rules that admit or refuse them. Not thread-safe: the runner
    calls it under its lock."""

    def __init__(self, max_concurrency: int, max_queue: int, tenants: Iterable[Tenant] = (), reserve: int = 0):
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.reserve = reserve  # places a tenant that runs a request may not take (the docstring's reserve)
        self._queues: dict[str, _TenantQueue] = {}
        self._size = 0
        self.admissions = 0  # requests admitted so far: the next one's admission number
        for tenant in tenants:  # the keys file's tenants: each has a queue place kept for it from the start
            self._queue(tenant, 0.0)

    # -- the waiting requests as one collection -------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Job]:
        for queue in self._queues.values():
            yield from queue.waiting

    def __contains__(self, job: Job) -> bool:
        queue = self._queues.get(job.tenant.name)
        return queue is not None and job in queue.waiting

    def waiting(self, tenant: Tenant) -> int:
        queue = self._queues.get(tenant.name)
        return 0 if queue is None else len(queue.waiting)

    def share(self, tenant: Tenant) -> int:
        """The most requests of this tenant that run at once."""
        own = tenant.max_concurrency
        return self.max_concurrency if own is None else min(own, self.max_concurrency)

    # -- submission -----------------------------------------------------------------------------------------

    def refusal(self, tenant: Tenant, running: Counter[str], now: float, service_seconds: float) -> Refusal | None:
        """Why a new request of this tenant must be refused now, or None; `running`: requests running by tenant,
        `service_seconds`: a request's mean time in the engine, for Retry-After."""
        queue = self._queue(tenant, now)
        queue.refill(now)
        rate = tenant.requests_per_minute
        if rate is not None and queue.tokens < 1.0:
            seconds = math.ceil((1.0 - queue.tokens) * 60.0 / rate)
            return Refusal("rate_limited", f"tenant {tenant.name!r} is over its limit of {rate} requests a minute; "
                           "retry later", max(1, seconds))
        share = self.share(tenant)
        mine = len(queue.waiting) + running[tenant.name]
        if tenant.max_queue is not None and mine >= share + tenant.max_queue:
            return Refusal("tenant_queue_full", f"tenant {tenant.name!r} has {mine} requests admitted, its most "
                           f"({share} running, {tenant.max_queue} waiting); retry later",
                           _seconds_until_a_place(service_seconds, share))
        capacity = self.max_concurrency + self.max_queue
        free = capacity - self._size - sum(running.values())
        # Places kept for the other tenants with nothing queued, one each, at most half the queue; a tenant with
        # nothing queued uses its own.
        kept = 0 if not queue.waiting else min(self.max_queue // 2, sum(
            1 for other in self._queues.values() if other is not queue and not other.waiting))
        if free <= kept:
            return Refusal("queue_full", f"the server is at capacity ({capacity} requests admitted); retry later",
                           _seconds_until_a_place(service_seconds, self.max_concurrency))
        return None

    def push(self, job: Job, now: float) -> None:
        """Queue an accepted request (refusal() said None): it takes a token of its tenant's rate limit."""
        queue = self._queue(job.tenant, now)
        if job.tenant.requests_per_minute is not None:
            queue.refill(now)
            queue.tokens -= 1.0
        queue.waiting.append(job)
        self._size += 1
        job.queued_at = self.admissions

    def remove(self, job: Job) -> bool:
        """Take a waiting job out (withdrawn); False if it is not waiting."""
        queue = self._queues.get(job.tenant.name)
        if queue is None or job not in queue.waiting:
            return False
        queue.waiting.remove(job)
        self._size -= 1
        return True

    def clear(self) -> list[Job]:
        jobs = list(self)
        for queue in self._queues.values():
            queue.waiting.clear()
        self._size = 0
        return jobs

    # -- admission ------------------------------------------------------------------------------------------

    def next_job(self, running: Counter[str], skip: set[str]) -> Job | None:
        """The request to admit next, left in its queue: the head of the queue of the tenant with the fewest
        running, ties to the one admitted longest ago; tenants at their share or in `skip` wait, and so does a
        tenant that runs a request when only the reserved places are free."""
        reserved_from = self.max_concurrency - self.held_in_reserve(running)
        in_use = sum(running.values())
        best: _TenantQueue | None = None
        for queue in self._queues.values():
            name = queue.tenant.name
            if not queue.waiting or name in skip or running[name] >= self.share(queue.tenant):
                continue
            if running[name] > 0 and in_use >= reserved_from:
                continue
            if best is None or (running[name], queue.last_admitted) < (running[best.tenant.name], best.last_admitted):
                best = queue
        return None if best is None else best.waiting[0]

    def held_in_reserve(self, running: Counter[str]) -> int:
        """The places kept free now for tenants that run none: the reserve, at most one per such tenant."""
        if not self.reserve:
            return 0
        idle = sum(1 for name in self._queues if running[name] == 0)
        return min(self.reserve, idle)

    def admit(self, job: Job) -> None:
        """Take the job next_job gave out of its queue; it gets the next admission number."""
        queue = self._queues[job.tenant.name]
        assert queue.waiting[0] is job
        queue.waiting.popleft()
        self._size -= 1
        job.admission = queue.last_admitted = self.admissions
        self.admissions += 1

    def _queue(self, tenant: Tenant, now: float) -> _TenantQueue:
        queue = self._queues.get(tenant.name)
        if queue is None:
            tokens = float(tenant.requests_per_minute or 0)
            queue = self._queues[tenant.name] = _TenantQueue(tenant, tokens=tokens, refilled=now)
        elif queue.tenant != tenant:  # the same name with other limits (a reloaded keys file): the new ones count
            queue.tenant = tenant
        return queue


def _seconds_until_a_place(service_seconds: float, places: int) -> int:
    """A request's time in the engine over the places that free together, at least a second."""
    return max(1, math.ceil(service_seconds / max(1, places)))
