"""Everything that drives the engine: admission, a bounded queue, the scheduling thread, cancellation, deadlines.

The engine batches requests (continuous batching) but is synchronous and not thread-safe, so one thread owns it:
it admits queued jobs into the engine's batch up to `max_concurrency` (and while adapter slots are free), taking
them from the tenants' queues by turns and within each tenant's share (server/fair_queue.py), calls
`Engine.step`, and forwards each request's events to its job with `loop.call_soon_threadsafe`. Between steps it
aborts the requests whose client went away or whose deadline passed (their slots are free for the next step);
the others in the batch go on undisturbed, as they do when one request fails.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from relat_core import AgentDone, Engine, Finished, Request, Result, TextDelta, TrainStep
from relat_core.engine import Event, Failed

from .errors import Cancelled, DeadlineExceeded, QueueFull, RateLimited, Unavailable
from .fair_queue import FairQueue
from .metrics import Metrics
from .tenants import ANONYMOUS, Tenant

log = logging.getLogger("relat_server")

_job_keys = itertools.count()
HEARTBEAT = object()  # yielded by Job.events when nothing happened for a while


@dataclass(eq=False)
class Job:
    request_id: str  # X-Request-Id, for the log
    request: Request
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    tenant: Tenant = ANONYMOUS
    submitted: float = field(default_factory=time.monotonic)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # bounded by steps + agents + max_tokens + 1 events
    key: str = field(default_factory=lambda: str(next(_job_keys)))  # unique in the engine, unlike X-Request-Id
    started: float | None = None  # when the engine took it
    last_text: float | None = None
    # Admission numbers, in the runner's order: how many requests the runner had admitted when this one was
    # queued, and this one's own number. Their difference is how many others were admitted while it waited.
    queued_at: int | None = None
    admission: int | None = None
    # Set by the runner while the job waits in its queue: takes the job out of the queue when it is cancelled.
    withdraw: Callable[[Job], None] | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def method(self) -> str:
        """The TTT method: the metrics label."""
        return self.request.ttt.method

    def cancel(self) -> None:
        """Stop the work at the next step or token, or leave the queue now; harmless once the job has ended.

        The streaming and non-streaming paths call this whenever their side of a request ends: when it finished,
        when the client left, and when the deadline passed (Job.events raised)."""
        self._cancelled.set()
        if self.withdraw is not None:
            self.withdraw(self)

    def stop_reason(self) -> str | None:
        """Why the worker must stop now, if it must: the deadline wins over a cancellation it caused."""
        if time.monotonic() >= self.deadline:
            return "timeout"
        if self._cancelled.is_set():
            return "cancelled"
        return None

    def post(self, item: Event | BaseException) -> None:
        """From the worker thread: hand an event or the terminal error to the asyncio side."""
        try:
            self.loop.call_soon_threadsafe(self.inbox.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server stopped and nobody is listening
            self.cancel()

    async def events(self, heartbeat: float | None = None) -> AsyncIterator[Event | object]:
        """Engine events up to and including Finished; raises the job's error, or DeadlineExceeded on time.

        With `heartbeat`, yields HEARTBEAT after that many quiet seconds (queued, or inside a long step), so
        that a stream can show life to proxies that close idle connections.
        """
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed before it finished")
            wait = remaining if heartbeat is None else min(remaining, heartbeat)
            try:
                item = await asyncio.wait_for(self.inbox.get(), wait)
            except asyncio.TimeoutError:
                if heartbeat is not None and time.monotonic() < self.deadline:
                    yield HEARTBEAT
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return


class Runner:
    """A bounded queue in front of one batched engine, worked by one scheduling thread."""

    def __init__(self, load_engine: Callable[[], Engine], metrics: Metrics, max_queue: int,
                 max_concurrency: int = 1, batch_window: float = 0.0,
                 on_death: Callable[[BaseException], None] | None = None,
                 on_result: Callable[[Result, Job], None] | None = None, tenants: tuple[Tenant, ...] = (),
                 tenant_reserve: int = 0):
        # An idle engine waits this long after a request arrives for others to join it: requests that start
        # together train together, while a request that arrives a moment late waits a whole training step and
        # stays a step out of phase (bench/RESULTS.md, section 6.4).
        self.batch_window = batch_window
        self._load_engine = load_engine
        self.engine: Engine | None = None  # loaded by the scheduling thread (`start`)
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.capacity = max_concurrency + max_queue  # requests admitted at once, running or waiting
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # The waiting jobs, one queue per tenant (`tenants`: the keys file's, known from the start; others are
        # added as they come), and the places kept for a tenant that runs none (`tenant_reserve`).
        self._waiting = FairQueue(max_concurrency, max_queue, tenants, tenant_reserve)
        self._running: dict[str, Job] = {}  # by job key, in the engine's batch
        self._service_seconds = 0.0  # moving average of a request's time in the engine, for Retry-After
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Called from the scheduling thread if it dies (not a request's failure: the thread's own), so that the
        # server can report it and exit for its supervisor to restart it.
        self.on_death = on_death
        # Called from the scheduling thread with each result before it goes to its job (the server keeps exported
        # adapters there), so that the result the client gets already says where its adapter is.
        self.on_result = on_result

    # -- asyncio side ---------------------------------------------------------------------------------------

    async def start(self) -> Engine:
        """Start the scheduling thread, which loads the engine before it serves; returns the engine once loaded
        (or raises what loading raised). All torch work stays on that one thread: when a second thread (the one
        that loaded the model) has run torch's parallel kernels, their OpenMP thread teams compete for the cores
        and a batched training step ran 1.5-2x slower (bench/RESULTS.md, section 6)."""
        loaded: asyncio.Future[Engine] = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(target=self._work, args=(loaded,), name="relat-engine", daemon=True)
        self._thread.start()
        return await loaded

    def submit(self, request_id: str, request: Request, timeout: float, tenant: Tenant = ANONYMOUS) -> Job:
        """Queue a request or refuse it at once: 429 with Retry-After when the server's queue, the tenant's queue or
        the tenant's rate limit is full (server/fair_queue.py), 503 when stopping."""
        now = time.monotonic()
        job = Job(request_id, request, now + timeout, asyncio.get_running_loop(), tenant)
        with self._lock:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            refusal = self._waiting.refusal(tenant, self._running_by_tenant(), now, self._service_seconds)
            if refusal is not None:
                self.metrics.requests.labels(job.method, "rejected").inc()
                self.metrics.tenant_rejected.labels(tenant.name, refusal.reason).inc()
                error = RateLimited if refusal.reason == "rate_limited" else QueueFull
                raise error(refusal.message, retry_after=refusal.retry_after)
            job.withdraw = self._withdraw
            self._waiting.push(job, now)
            self.metrics.waiting.set(len(self._waiting))
            self._wake.notify()
        return job

    def _withdraw(self, job: Job) -> None:
        """A job cancelled while it waits leaves the queue at once: its client has gone or its deadline passed,
        and the scheduling thread, which would drop it at its next admission, may be a long training step away.
        Until then it would hold a place that a live request is refused for (429)."""
        with self._lock:
            if not self._waiting.remove(job):  # admitted already: the scheduling thread stops it between steps
                return
            self.metrics.waiting.set(len(self._waiting))
        reason = job.stop_reason() or "cancelled"
        job.post(_stop_error(reason))
        self.metrics.requests.labels(job.method, reason).inc()
        log.info("request %s: %s %s after %.2f s queued, never started", job.request_id, job.method, reason,
                 time.monotonic() - job.submitted)

    def _running_by_tenant(self) -> Counter[str]:
        """Under the lock: requests in the engine's batch by tenant name."""
        return Counter(job.tenant.name for job in self._running.values())

    def counts(self) -> tuple[int, int]:
        """Requests (running in the engine, waiting in the queue)."""
        with self._lock:
            return len(self._running), len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is queued or running, up to `timeout`; True if it emptied."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return not self.busy

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new work, cancel what is left, and let the thread finish its current step."""
        with self._lock:
            self._stopping = True
            jobs = [*self._waiting, *self._running.values()]
            self._wake.notify()
        for job in jobs:  # outside the lock: a waiting job's cancel takes it, to leave the queue
            job.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- scheduling thread ----------------------------------------------------------------------------------

    def _work(self, loaded: asyncio.Future[Engine]) -> None:
        loop = loaded.get_loop()
        try:
            self.engine = self._load_engine()
        except Exception as error:
            loop.call_soon_threadsafe(loaded.set_exception, error)
            return
        loop.call_soon_threadsafe(loaded.set_result, self.engine)
        try:
            self._serve()
        except BaseException as error:
            self._die(error)

    def _die(self, error: BaseException) -> None:
        """The thread's loop raised: refuse new work, end every request admitted with the error (nothing will run
        them), and tell the server."""
        log.critical("the engine's thread died", exc_info=error)
        with self._lock:
            self._stopping = True
            jobs = [*self._waiting.clear(), *self._running.values()]
            self._running.clear()
        for job in jobs:
            job.post(error)
        if self.on_death is not None:
            self.on_death(error)

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._stopping):
                    self._wake.wait()
                if self._stopping and not (self._waiting or self._running):
                    return
                if not self._running:  # idle: let the requests of a burst arrive, to start them as one batch
                    window_end = time.monotonic() + self.batch_window
                    while (len(self._waiting) < self.max_concurrency and not self._stopping
                           and (left := window_end - time.monotonic()) > 0):
                        self._wake.wait(left)
                admitted = self._admit()
            for job in admitted:
                self._start(job)
            self.metrics.observe_cache(self.engine.adapter_cache.stats)  # hits and misses count when admitted
            self._stop_expired()
            if not self.engine.has_unfinished_requests:
                continue
            try:
                events = self.engine.step()
            except Exception as error:  # the batch itself failed (not one request): every request in it ends
                log.exception("engine step failed")
                for job in list(self._running.values()):
                    self._end(job, "error", error)
                continue
            for key, event in events:
                job = self._running.get(key)
                if job is not None:
                    self._forward(job, event)

    def _admit(self) -> list[Job]:
        """Under the lock: take waiting jobs, by tenant in turn and within each tenant's share (FairQueue.next_job),
        while the batch has room and, for a job that trains an adapter, a free slot (a job that would wait for a
        slot keeps its place at the head of its tenant's line; other tenants' jobs that need none may go)."""
        admitted = []
        free_slots = len(self.engine.bank.free)
        running = self._running_by_tenant()
        waiting_for_a_slot: set[str] = set()
        while len(self._running) < self.max_concurrency:
            job = self._waiting.next_job(running, waiting_for_a_slot)
            if job is None:
                break
            if job.request.ttt.trains and not job.stop_reason():
                if free_slots == 0:
                    waiting_for_a_slot.add(job.tenant.name)
                    continue
                free_slots -= 1
            self._waiting.admit(job)
            running[job.tenant.name] += 1
            self._running[job.key] = job
            admitted.append(job)
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.running.set(len(self._running))
        return admitted

    def _start(self, job: Job) -> None:
        job.started = time.monotonic()
        self.metrics.queue_time.observe(job.started - job.submitted)
        reason = job.stop_reason()
        if reason is not None:  # cancelled or expired while queued: the engine never sees it
            self._end(job, reason, _stop_error(reason))
            return
        try:
            self.engine.add_request(job.key, job.request)
        except Exception as error:
            self._end(job, "error", error)
        self.metrics.slots.set(self.engine.slots_in_use)

    def _stop_expired(self) -> None:
        """Between steps: abort the requests whose client went away or whose deadline passed."""
        for job in list(self._running.values()):
            reason = job.stop_reason()
            if reason is not None:
                self._end(job, reason, _stop_error(reason))

    def _forward(self, job: Job, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, Failed):  # this request alone failed; describe() logs it
            self._end(job, "error", event.error)
            return
        if isinstance(event, TrainStep):
            self.metrics.ttt_steps_run.inc()
        elif isinstance(event, AgentDone):
            self.metrics.agent_turns_run.labels(event.turn["kind"]).inc()
        elif isinstance(event, TextDelta):
            if job.last_text is None:
                self.metrics.ttft.observe(now - job.submitted)
            else:
                self.metrics.itl.observe(now - job.last_text)
            job.last_text = now
        if isinstance(event, Finished) and self.on_result is not None:
            try:
                self.on_result(event.result, job)
            except Exception as error:  # a server bug: this request's 500, not the engine thread's death
                self._end(job, "error", error)
                return
        if isinstance(event, Finished):
            # Its metrics and log line before the client has its answer: a client that reads /metrics or the log
            # right after its response finds its request there (the log line came after it under load: a CI race).
            self._observe_result(event, job, now)
            self._end(job, "success")
        job.post(event)

    def _end(self, job: Job, outcome: str, error: BaseException | None = None) -> None:
        """The job leaves the engine (aborted there unless it finished) and the running set; errors go to it."""
        if error is not None:
            job.post(error)
        self.engine.abort_request(job.key)
        now = time.monotonic()
        started = job.started if job.started is not None else now
        with self._lock:
            self._running.pop(job.key, None)
            self._service_seconds = 0.8 * self._service_seconds + 0.2 * (now - started)
            self.metrics.running.set(len(self._running))
            self._wake.notify()
        self.metrics.slots.set(self.engine.slots_in_use)
        self.metrics.requests.labels(job.method, outcome).inc()
        log.info("request %s: %s %s, %.2f s queued (%d admitted before it), %.2f s in the engine", job.request_id,
                 job.method, outcome, started - job.submitted, _overtaken(job), now - started)

    def _observe_result(self, event: Finished, job: Job, now: float) -> None:
        result, metrics = event.result, self.metrics
        trace = result.trace
        metrics.e2e.observe(now - job.submitted)
        metrics.prompt_tokens.inc(result.usage.prompt_tokens)
        metrics.generation_tokens.inc(result.usage.completion_tokens)
        if trace.cache == "hit":  # no training ran: its figures are the cached adapter's, counted when it trained
            return
        if trace.gate is not None:
            metrics.gate_decisions.labels(trace.gate["kind"], "kept" if trace.gated else "trained").inc()
        if job.request.ttt.trains and not trace.gated:  # a request its gate kept trained nothing
            metrics.ttt_time.observe(trace.timings.get("train_s", 0.0))
            metrics.ttt_steps.observe(len(trace.steps))
        if trace.recon_loss_before is not None:
            metrics.recon_before.observe(trace.recon_loss_before)
        if trace.recon_loss_after is not None:
            metrics.recon_after.observe(trace.recon_loss_after)


def _overtaken(job: Job) -> int:
    """How many requests were admitted while this one waited."""
    if job.admission is None or job.queued_at is None:
        return 0
    return job.admission - job.queued_at


def _stop_error(reason: str) -> Exception:
    if reason == "timeout":
        return DeadlineExceeded("the request's deadline passed before it finished")
    return Cancelled("the request was cancelled")
