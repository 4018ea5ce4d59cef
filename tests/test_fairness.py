"""Fair shares between tenants (server/fair_queue.py, server/runner.py): admission by turns, shares of the batch,
per-tenant queues and rate limits.

What is checked is the order the runner admits requests in (each job's admission number and the number the runner
had reached when it was queued), what it refuses and why, never a duration: a flood's effect on time is measured
in bench/fairness.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from relat_server.errors import QueueFull, RateLimited, describe
from relat_server.fair_queue import FairQueue
from relat_server.metrics import Metrics
from relat_server.runner import Runner
from relat_server.settings import Settings
from relat_server.tenants import Tenant

from relat_core import Engine, Finished, Request, SamplingParams, TTTParams

from .conftest import build_tiny
from .server_support import serve_in_thread, wait_for

QUESTION = [{"role": "user", "content": "Name three colours."}]


def direct(tokens: int) -> Request:
    """A request that trains nothing and decodes exactly `tokens` tokens: as many engine steps as tokens."""
    return Request(QUESTION, TTTParams(method="direct"), SamplingParams(max_tokens=tokens, ignore_eos=True))


def rejected(metrics: Metrics, tenant: str, reason: str) -> float:
    """relat_tenant_rejected_total{tenant, reason} as /metrics exports it."""
    value = metrics.registry.get_sample_value("relat_tenant_rejected_total", {"tenant": tenant, "reason": reason})
    return value or 0.0


@pytest.fixture(scope="module")
def engine(tokenizer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(build_tiny("qwen3", tokenizer, seed=3))
    torch.set_num_threads(threads)


def queued_runner(max_concurrency: int, max_queue: int, *tenants: Tenant) -> Runner:
    """A runner whose scheduling thread is not started: what it refuses depends only on what it holds, and every
    request it accepts stays queued."""
    return Runner(lambda: None, Metrics(), max_queue, max_concurrency, tenants=tenants)


# --- admission under a flood, on a real engine -----------------------------------------------------------------------

def test_a_flooding_tenant_does_not_make_another_wait_behind_its_queue(engine):
    """A sends 20 requests at once, 10x its share (2 places, 2 tenants busy: 1 each), while B sends one request at
    a time: every B request is admitted and runs, none is refused, and at most one request is admitted between a B
    request's arrival and its admission, while A's queue holds many (FIFO would put B behind all of them)."""
    flooder, steady = Tenant("a"), Tenant("b")
    metrics = Metrics()
    runner = Runner(lambda: engine, metrics, max_queue=24, max_concurrency=2, tenants=(flooder, steady))

    async def scenario():
        await runner.start()
        try:
            flood = [runner.submit(f"a{i}", direct(12), 600, flooder) for i in range(20)]
            observed = []
            for i in range(5):
                with runner._lock:  # what B is up against as it arrives
                    a_waiting = runner._waiting.waiting(flooder)
                job = runner.submit(f"b{i}", direct(4), 600, steady)
                async for event in job.events():
                    if isinstance(event, Finished):
                        observed.append((a_waiting, job.admission - job.queued_at, event.result))
            results = []
            for job in flood:
                results += [event.result async for event in job.events() if isinstance(event, Finished)]
            return flood, observed, results
        finally:
            await asyncio.to_thread(runner.stop)

    flood, observed, results = asyncio.run(scenario())
    assert len(observed) == 5 and len(results) == 20  # every request of both ran to the end; none was refused
    for a_waiting, overtaken, result in observed:
        assert result.usage.completion_tokens == 4
        assert overtaken <= 1, f"{overtaken} requests admitted ahead of B's while A had {a_waiting} queued"
    # B jumped real queues: A had several requests waiting when B arrived (FIFO would have put B behind them).
    assert max(a_waiting for a_waiting, _, _ in observed) >= 5
    # A's own requests kept their order among themselves.
    assert [job.admission for job in flood] == sorted(job.admission for job in flood)
    assert rejected(metrics, "a", "queue_full") == rejected(metrics, "b", "queue_full") == 0


def flood_then_one_request(engine, reserve: int) -> tuple[list[str], list[str]]:
    """Max_concurrency 4: A sends 12 requests of 48 tokens; once A runs all it may, B sends one of 4 tokens. A's
    requests that had finished when B's ended, and those still running then."""
    flooder, steady = Tenant("a"), Tenant("b")
    runner = Runner(lambda: engine, Metrics(), max_queue=24, max_concurrency=4, tenants=(flooder, steady),
                    tenant_reserve=reserve)

    async def scenario():
        await runner.start()
        try:
            flood = [runner.submit(f"a{i}", direct(48), 600, flooder) for i in range(12)]
            while runner.counts()[0] < 4 - reserve:  # A fills what it may take
                await asyncio.sleep(0.001)
            job = runner.submit("b", direct(4), 600, steady)
            [result] = [event.result async for event in job.events() if isinstance(event, Finished)]
            assert result.usage.completion_tokens == 4
            with runner._lock:
                running = [other.request_id for other in runner._running.values() if other.tenant is flooder]
            finished = [other.request_id for other in flood if other.started is not None
                        and other.request_id not in running]
            return finished, running
        finally:
            await asyncio.to_thread(runner.stop)

    return asyncio.run(scenario())


def test_with_a_reserve_a_flood_leaves_a_place_and_another_tenant_starts_without_waiting_for_it(engine):
    """With a reserve of 1 of 4 places, A's flood runs 3, and B's request runs to its end while A's first three
    still run (B needs 4 tokens, each of A's 48): it did not wait for any of A's to finish. Without a reserve
    (the work-conserving rule alone), A runs all 4 and B starts only once one of A's has finished."""
    finished, running = flood_then_one_request(engine, reserve=1)
    assert finished == [] and sorted(running) == ["a0", "a1", "a2"]
    finished, _ = flood_then_one_request(engine, reserve=0)
    assert len(finished) >= 1  # (A's next one may have taken B's place by now: nothing is kept without a reserve)


# --- the admission rule, on the queues alone ---------------------------------------------------------------------

def jobs_of(tenant: Tenant, count: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(tenant=tenant, name=f"{tenant.name}{i}", queued_at=None, admission=None)
            for i in range(count)]


def admit_all(queues: FairQueue, running: Counter, limit: int) -> list[str]:
    """Admit while places are free (running jobs never finish here); the admitted jobs' names in order."""
    order = []
    while sum(running.values()) < limit and (job := queues.next_job(running, set())) is not None:
        queues.admit(job)
        running[job.tenant.name] += 1
        order.append(job.name)
    return order


def test_admission_takes_turns_by_tenant_and_gives_a_freed_place_to_the_tenant_running_least():
    a, b, c = Tenant("a"), Tenant("b"), Tenant("c")
    queues = FairQueue(max_concurrency=6, max_queue=30)
    for job in jobs_of(a, 10) + jobs_of(b, 3) + jobs_of(c, 2):  # A's whole queue arrives first
        queues.push(job, 0.0)
    assert admit_all(queues, Counter(), 6) == ["a0", "b0", "c0", "a1", "b1", "c1"]
    # A runs 5 places alone; B arrives; one of A's finishes: the place goes to B, not to A's queue.
    queues = FairQueue(max_concurrency=5, max_queue=30)
    for job in jobs_of(a, 10):
        queues.push(job, 0.0)
    running = Counter()
    assert admit_all(queues, running, 5) == ["a0", "a1", "a2", "a3", "a4"]  # alone: all of the batch (work-conserving)
    for job in jobs_of(b, 2):
        queues.push(job, 0.0)
    running["a"] -= 1
    assert admit_all(queues, running, 5) == ["b0"]
    running["a"] -= 1
    assert admit_all(queues, running, 5) == ["b1"]


def test_a_tenants_own_max_concurrency_caps_it_even_alone():
    capped = Tenant("capped", max_concurrency=2)
    queues = FairQueue(max_concurrency=8, max_queue=8)
    for job in jobs_of(capped, 5):
        queues.push(job, 0.0)
    running = Counter()
    assert admit_all(queues, running, 8) == ["capped0", "capped1"]
    running["capped"] -= 1
    assert admit_all(queues, running, 8) == ["capped2"]


def test_a_reserve_keeps_the_last_places_for_a_tenant_that_runs_none():
    a, b, c = Tenant("a"), Tenant("b"), Tenant("c")
    queues = FairQueue(max_concurrency=4, max_queue=30, tenants=(a, b), reserve=1)
    for job in jobs_of(a, 10):
        queues.push(job, 0.0)
    running = Counter()
    assert admit_all(queues, running, 4) == ["a0", "a1", "a2"]  # A alone floods: the last place stays free
    for job in jobs_of(b, 2):
        queues.push(job, 0.0)
    assert admit_all(queues, running, 4) == ["b0"]  # B at the next admission, none of A's having finished
    running["a"] -= 1  # one of A's finishes while B runs: every tenant runs, nobody is left to keep a place for
    assert admit_all(queues, running, 4) == ["b1"]  # B runs fewer (1 < 2): its turn first
    running["b"] -= 2  # B's both finish: B runs none again, and its place is kept
    assert admit_all(queues, running, 4) == ["a3"]
    assert running == Counter(a=3, b=0)
    # A third tenant, never seen before, arrives too: one place is kept, at most `reserve` in all.
    for job in jobs_of(c, 1):
        queues.push(job, 0.0)
    assert admit_all(queues, running, 4) == ["c0"]
    # Two places kept for two tenants that run none, one for one.
    queues = FairQueue(max_concurrency=4, max_queue=30, tenants=(a, b, c), reserve=2)
    for job in jobs_of(a, 10):
        queues.push(job, 0.0)
    running = Counter()
    assert admit_all(queues, running, 4) == ["a0", "a1"]
    for job in jobs_of(b, 3):
        queues.push(job, 0.0)
    assert admit_all(queues, running, 4) == ["b0"]  # C still runs none: one place kept for it


def test_a_tenants_own_cap_still_holds_under_a_reserve_and_no_reserve_is_the_work_conserving_rule():
    capped, other = Tenant("a", max_concurrency=2), Tenant("b")
    queues = FairQueue(max_concurrency=4, max_queue=30, tenants=(capped, other), reserve=1)
    for job in jobs_of(capped, 5):
        queues.push(job, 0.0)
    assert admit_all(queues, Counter(), 4) == ["a0", "a1"]
    flooder = Tenant("a")
    queues = FairQueue(max_concurrency=4, max_queue=30, tenants=(flooder, other), reserve=0)
    for job in jobs_of(flooder, 6):
        queues.push(job, 0.0)
    running = Counter()
    assert admit_all(queues, running, 4) == ["a0", "a1", "a2", "a3"]
    for job in jobs_of(other, 1):
        queues.push(job, 0.0)
    assert admit_all(queues, running, 4) == []  # B waits for one of A's to finish
    running["a"] -= 1
    assert admit_all(queues, running, 4) == ["b0"]


def two_tenant_keys_file(tmp_path) -> str:
    path = tmp_path / "keys.json"
    tenants = [{"name": name, "key_sha256": hashlib.sha256(f"sk-{name}".encode()).hexdigest()} for name in "ab"]
    path.write_text(json.dumps({"tenants": tenants}))
    return str(path)


def test_the_reserve_defaults_to_one_place_with_several_tenants_and_none_for_one_tenant(tmp_path):
    keys = two_tenant_keys_file(tmp_path)
    several = 2  # a keys file of two tenants
    assert Settings(max_concurrency=4, keys_file=keys).tenant_reserve_places(several) == 1
    assert Settings(max_concurrency=1, keys_file=keys).tenant_reserve_places(several) == 0  # no place to keep
    assert Settings(max_concurrency=4, keys_file=keys, tenant_reserve=0).tenant_reserve_places(several) == 0
    assert Settings(max_concurrency=8, keys_file=keys, tenant_reserve=3).tenant_reserve_places(several) == 3
    # One tenant (a keyless server, or --api-key alone): nobody to keep a place for, whatever is set.
    assert Settings(max_concurrency=4).tenant_reserve_places(0) == 0
    assert Settings(max_concurrency=4, api_keys=["sk-x"], tenant_reserve=2).tenant_reserve_places(1) == 0
    with pytest.raises(ValueError, match="tenant_reserve 4 must be below max_concurrency 4"):
        Settings(max_concurrency=4, tenant_reserve=4)


@pytest.mark.parametrize("settings, reserve", [({"keys_file": "two tenants"}, 1),
                                               ({"keys_file": "two tenants", "api_keys": ["sk-x"]}, 1),
                                               ({"api_keys": ["sk-x"]}, 0), ({}, 0)])
def test_the_server_runs_its_queue_with_the_reserve_for_its_tenants(engine, tmp_path, settings, reserve):
    if "keys_file" in settings:
        settings = {**settings, "keys_file": two_tenant_keys_file(tmp_path)}
    with serve_in_thread(Settings(max_concurrency=4, **settings), lambda: engine) as served:
        service = served.app.state.service
        wait_for(lambda: service.runner is not None, "the runner")  # the model loads in the background
        assert service.runner._waiting.reserve == reserve


# --- refusals: per-tenant queue, rate limit, the server's queue --------------------------------------------------

def submit(runner: Runner, tenant: Tenant, count: int) -> list:
    """Submit `count` requests of the tenant (inside an event loop, as the server does); each the job or the error."""
    async def go():
        outcomes = []
        for i in range(count):
            try:
                outcomes.append(runner.submit(f"{tenant.name}{i}", direct(1), 600, tenant))
            except QueueFull as error:
                outcomes.append(error)
        return outcomes

    return asyncio.run(go())


def test_a_tenants_max_queue_refuses_its_requests_with_429_and_retry_after_and_not_the_others():
    limited, other = Tenant("a", max_concurrency=1, max_queue=2), Tenant("b")
    runner = queued_runner(4, 16, limited, other)
    outcomes = submit(runner, limited, 5)
    # Its share (1 running) and its queue (2) are admitted, the rest refused.
    assert [isinstance(o, QueueFull) for o in outcomes] == [False, False, False, True, True]
    info = describe(outcomes[3])
    assert info.status == 429 and info.code == "queue_full" and int(info.headers["Retry-After"]) >= 1
    assert "'a'" in info.message
    assert not any(isinstance(o, QueueFull) for o in submit(runner, other, 6))
    assert rejected(runner.metrics, "a", "tenant_queue_full") == 2
    assert rejected(runner.metrics, "b", "tenant_queue_full") == 0


def test_a_tenants_rate_limit_refuses_with_429_and_seconds_until_a_token_and_not_the_others():
    limited, other = Tenant("a", requests_per_minute=3), Tenant("b")
    runner = queued_runner(2, 16, limited, other)
    outcomes = submit(runner, limited, 5)
    assert [isinstance(o, RateLimited) for o in outcomes] == [False, False, False, True, True]
    info = describe(outcomes[3])
    assert info.status == 429 and info.code == "rate_limited"
    # The bucket refills a token every 60 / 3 = 20 s; the test's submissions took a moment of that.
    assert 1 <= int(info.headers["Retry-After"]) <= 20
    assert not any(isinstance(o, QueueFull) for o in submit(runner, other, 6))
    assert rejected(runner.metrics, "a", "rate_limited") == 2 and rejected(runner.metrics, "b", "rate_limited") == 0


def test_a_rate_limit_refills_with_time():
    limited = Tenant("a", requests_per_minute=60)
    queues = FairQueue(max_concurrency=100, max_queue=100)
    for _ in range(60):
        assert queues.refusal(limited, Counter(), 1000.0, 1.0) is None
        queues.push(SimpleNamespace(tenant=limited, queued_at=None), 1000.0)
    refusal = queues.refusal(limited, Counter(), 1000.0, 1.0)
    assert refusal.reason == "rate_limited" and refusal.retry_after == 1
    assert queues.refusal(limited, Counter(), 1000.5, 1.0) is not None  # half a token
    assert queues.refusal(limited, Counter(), 1001.0, 1.0) is None  # one a second


def test_a_flood_without_its_own_limit_leaves_places_for_the_others_and_the_servers_queue_still_holds():
    flooder, steady = Tenant("a"), Tenant("b")
    runner = queued_runner(1, 4, flooder, steady)  # capacity 5; one place kept for B while B has nothing queued
    outcomes = submit(runner, flooder, 8)
    assert [isinstance(o, QueueFull) for o in outcomes] == [False] * 4 + [True] * 4
    assert rejected(runner.metrics, "a", "queue_full") == 4
    # B finds its place; the next one is over the server's capacity, for B as for anyone.
    assert [isinstance(o, QueueFull) for o in submit(runner, steady, 2)] == [False, True]
    assert sum(runner.counts()) == 5


def test_a_lone_tenant_may_use_the_whole_queue():
    runner = queued_runner(1, 4)  # a keyless or single-key server: one tenant, no places kept
    assert [isinstance(o, QueueFull) for o in submit(runner, Tenant("anonymous"), 6)] == [False] * 5 + [True]


def test_a_withdrawn_request_leaves_its_tenants_queue():
    limited = Tenant("a", max_concurrency=1, max_queue=0)
    runner = queued_runner(2, 4, limited)
    first, second = submit(runner, limited, 2)
    assert isinstance(second, QueueFull)
    first.cancel()  # its client went away: it leaves the queue at once
    assert runner.counts() == (0, 0)
    assert not isinstance(submit(runner, limited, 1)[0], QueueFull)

