"""Everything that drives the engine: a bounded queue, a worker thread, cancellation and deadlines.

The engine is synchronous and not thread-safe, so one worker thread owns it and runs one request at a time
(the batched engine of issue 4 will replace what is inside `Runner`, not its interface). The asyncio side
submits a `Job` and reads its events; the worker forwards each engine event with `loop.call_soon_threadsafe`
and, between events (after each training step and each text delta), stops the work if the job was cancelled
or its deadline passed: closing the engine's generator frees its adapter slot at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from relat_core import Engine, Finished, Request, TextDelta, TrainStep
from relat_core.engine import Event

from .errors import Cancelled, DeadlineExceeded, QueueFull, Unavailable
from .metrics import Metrics

log = logging.getLogger("relat_server")

HEARTBEAT = object()  # yielded by Job.events when nothing happened for a while


@dataclass(eq=False)
class Job:
    request_id: str  # X-Request-Id, for the log
    request: Request
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.monotonic)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # bounded by steps + max_tokens + 1 events
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def method(self) -> str:
        """The TTT method: the metrics label."""
        return self.request.ttt.method

    def cancel(self) -> None:
        """Stop the work at the next step or token; harmless once the job has ended."""
        self._cancelled.set()

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
    """A bounded queue in front of one engine, worked by one thread."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int, max_concurrency: int = 1):
        if max_concurrency > 1:
            # The engine holds global autograd and adapter-binding state across its yields, so two requests cannot
            # interleave on it; the batched engine (issue 4) lifts this. Admission still counts max_concurrency
            # places, so that the limits clients see stay as configured when it does.
            log.warning("max_concurrency=%d: this engine runs one request at a time; the others wait their turn",
                        max_concurrency)
        self.engine = engine
        self.metrics = metrics
        self.capacity = max_concurrency + max_queue  # requests admitted at once, running or waiting
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._service_seconds = 0.0  # moving average of a request's time in the engine, for Retry-After
        self._active: set[Job] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="relat-engine", daemon=True)

    # -- asyncio side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request_id: str, request: Request, timeout: float) -> Job:
        """Queue a request or refuse it at once (429 with a Retry-After estimate, 503 when stopping)."""
        job = Job(request_id, request, time.monotonic() + timeout, asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if self._waiting + self._running >= self.capacity:
                self.metrics.requests.labels(job.method, "rejected").inc()
                raise QueueFull(f"the server is at capacity ({self.capacity} requests admitted); retry later",
                                retry_after=self._retry_after())
            self._waiting += 1
            self._active.add(job)
            self.metrics.waiting.set(self._waiting)
        self._queue.put(job)
        return job

    def _retry_after(self) -> int:
        """Seconds until a queue place is likely free: one request's service time, at least a second."""
        return max(1, math.ceil(self._service_seconds))

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._waiting + self._running > 0

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is queued or running, up to `timeout`; True if it emptied."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return not self.busy

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new work, cancel what is left, and let the worker finish its current step."""
        with self._lock:
            self._stopping = True
            for job in self._active:
                job.cancel()
        self._queue.put(None)
        self._thread.join(timeout)

    # -- worker thread --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._waiting -= 1
                self._running += 1
                self.metrics.waiting.set(self._waiting)
                self.metrics.running.set(self._running)
            started = time.monotonic()
            try:
                outcome = self._run(job, started)
            finally:
                with self._lock:
                    self._running -= 1
                    self._active.discard(job)
                    self.metrics.running.set(self._running)
                    self._service_seconds = 0.8 * self._service_seconds + 0.2 * (time.monotonic() - started)
            self.metrics.requests.labels(job.method, outcome).inc()
            log.info("request %s: %s %s, %.2f s queued, %.2f s in the engine", job.request_id, job.method, outcome,
                     started - job.submitted, time.monotonic() - started)

    def _run(self, job: Job, started: float) -> str:
        """Run one job to its end; returns its outcome. Errors go to the job, never up into the thread."""
        metrics = self.metrics
        metrics.queue_time.observe(started - job.submitted)
        reason = job.stop_reason()
        if reason is not None:  # cancelled or expired while queued: the engine never sees it
            job.post(_stop_error(reason))
            return reason
        last_text: float | None = None
        generator = self.engine.generate(job.request)
        try:
            for event in generator:
                now = time.monotonic()
                if isinstance(event, TrainStep):
                    metrics.ttt_steps_run.inc()
                    metrics.slots.set(self.engine.slots_in_use)
                elif isinstance(event, TextDelta):
                    if last_text is None:
                        metrics.ttft.observe(now - job.submitted)
                    else:
                        metrics.itl.observe(now - last_text)
                    last_text = now
                elif isinstance(event, Finished):
                    self._observe_result(event, job, now)
                job.post(event)
                if isinstance(event, Finished):
                    return "success"
                reason = job.stop_reason()
                if reason is not None:
                    job.post(_stop_error(reason))
                    return reason
            raise RuntimeError("the engine ended a request without a result")
        except Exception as error:  # an engine failure ends this request only; describe() logs it
            job.post(error)
            return "error"
        finally:
            generator.close()  # cancels the engine's work and releases the adapter slot
            metrics.slots.set(self.engine.slots_in_use)

    def _observe_result(self, event: Finished, job: Job, now: float) -> None:
        result, metrics = event.result, self.metrics
        trace = result.trace
        metrics.e2e.observe(now - job.submitted)
        metrics.prompt_tokens.inc(result.usage.prompt_tokens)
        metrics.generation_tokens.inc(result.usage.completion_tokens)
        if job.request.ttt.trains:
            metrics.ttt_time.observe(trace.timings.get("train_s", 0.0))
            metrics.ttt_steps.observe(len(trace.steps))
        if trace.recon_loss_before is not None:
            metrics.recon_before.observe(trace.recon_loss_before)
        if trace.recon_loss_after is not None:
            metrics.recon_after.observe(trace.recon_loss_after)


def _stop_error(reason: str) -> Exception:
    if reason == "timeout":
        return DeadlineExceeded("the request's deadline passed before it finished")
    return Cancelled("the request was cancelled")
