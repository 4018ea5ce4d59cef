"""Where `relat eval`'s requests run: an engine in this process, or a server through its native endpoint.

Both take jobs (a prompt and a variant's options) and yield (job, outcome) as answers come, in whatever order
they finish. An outcome is the server's /v1/relat result ({answer, finish_reason, usage, trace}, with the
request's latency in seconds), or an error for a request that failed on its own (it is recorded, and scores as
wrong: a benchmark that dropped failures would score what remains). A failure of the target itself (the server
unreachable, or overloaded past the retries) stops the run instead, unrecorded, so that a rerun tries those items
again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from .variants import Variant


@dataclass(frozen=True, eq=False)
class Job:
    """One request: a variant on an item of a data file."""

    data: str  # the file's name
    index: int
    task: str
    item: dict
    prompt: str
    max_tokens: int
    variant: Variant
    # --mc-scoring loglik: the options' texts, each scored as the answer to `prompt` (a raw prompt, no template),
    # all of them after the request's one training (relat_core's Request.continuations); None: generation.
    continuations: tuple[str, ...] | None = None

    @property
    def request_id(self) -> str:
        return f"{self.data}#{self.index}:{self.variant.name}"


@dataclass
class Outcome:
    seconds: float  # latency: from admission (or the call) to the answer
    result: dict[str, Any] | None = None  # answer, finish_reason, usage, trace
    error: str | None = None


class TargetFailed(RuntimeError):
    """The server (not one request) failed: stop, and let a rerun resume."""


class LocalRunner:
    """An engine in this process, `batch` requests at a time (continuous batching: the next is admitted as soon as
    one finishes). The engine answers each request as it would alone, up to float rounding, so the scores do not
    depend on `batch`; the latencies do."""

    def __init__(self, model: str | None, device: str | None, dtype: str | None, batch: int, threads: int | None,
                 agent_prompts: Any = None, weights: str = "auto"):
        import torch

        from relat_core import Engine, load_model

        if threads:
            torch.set_num_threads(threads)
        self.loaded = load_model(model, device=device, dtype=dtype, weights=weights)
        self.engine = Engine(self.loaded, num_slots=batch, agent_prompts=agent_prompts)
        self.batch = batch
        self.model_name = self.loaded.name

    def full_options(self, variant: Variant) -> dict[str, Any]:
        """The options the variant runs with, as they apply (adapter_during_answer as applied, as a trace says)."""
        return {**self.engine.defaults.replace(**variant.ttt).as_applied(), **variant.sampling}

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
        from relat_core import EngineBusy, Finished, Request, SamplingParams
        from relat_core.engine import Failed  # not among relat_core's exports

        todo = deque(jobs)
        in_flight: dict[str, tuple[Job, float]] = {}
        while todo or in_flight:
            while todo and len(in_flight) < self.batch:
                job = todo[0]
                sampling = {"max_tokens": job.max_tokens, "temperature": 0.0, **job.variant.sampling}
                ttt = self.engine.defaults.replace(**job.variant.ttt)
                if job.continuations is None:
                    request = Request([{"role": "user", "content": job.prompt}], ttt, SamplingParams(**sampling))
                else:
                    request = Request(prompt=job.prompt, ttt=ttt, sampling=SamplingParams(**sampling),
                                      continuations=list(job.continuations))
                try:
                    self.engine.add_request(job.request_id, request)
                except EngineBusy:
                    if not in_flight:  # nothing will free a slot: waiting would never end
                        raise
                    break  # every slot is leased: admit it when a request finishes
                except ValueError as error:  # a request this engine refuses (its prompt too long, ...)
                    todo.popleft()
                    yield job, Outcome(0.0, error=f"{type(error).__name__}: {error}")
                    continue
                todo.popleft()
                in_flight[job.request_id] = (job, time.perf_counter())
            for request_id, event in self.engine.step():
                if isinstance(event, (Finished, Failed)):
                    job, admitted = in_flight.pop(request_id)
                    seconds = time.perf_counter() - admitted
                    if isinstance(event, Failed):
                        yield job, Outcome(seconds, error=f"{type(event.error).__name__}: {event.error}")
                    else:
                        yield job, Outcome(seconds, result=_result_dict(event.result, job.continuations is not None))

    def close(self) -> None:
        pass


def _result_dict(result: Any, scored: bool = False) -> dict[str, Any]:
    """The engine's result in /v1/relat's shape; of scored continuations, each option's score, and the answer the
    likeliest option's text."""
    usage = {**asdict(result.usage), "total_tokens": result.usage.total_tokens}
    outcome = {"answer": result.text, "finish_reason": result.finish_reason, "usage": usage,
               "trace": result.trace.to_dict()}
    if scored:
        outcome["options"] = [_option(choice.text, [entry.logprob for entry in choice.logprobs])
                              for choice in result.choices]
        outcome["answer"] = max(outcome["options"], key=lambda option: option["logprob"])["text"]
    return outcome


def _option(text: str, logprobs: list[float]) -> dict[str, Any]:
    """An option's score: the sum of its tokens' logprobs, with its token and character counts (per-token or
    per-character normalisations are computed from the records)."""
    return {"text": text, "logprob": sum(logprobs), "tokens": len(logprobs), "chars": len(text)}


RETRIES = 3  # per request, on 429/503 and lost connections, with backoff
RETRY_STATUSES = (429, 502, 503, 504)


class ServerRunner:
    """A relat server, `concurrency` requests at a time through POST /v1/relat (the server batches them)."""

    def __init__(self, url: str, api_key: str | None, concurrency: int):
        from relat_client import RelatClient

        self.client = RelatClient(url, api_key=api_key)
        self.concurrency = concurrency
        self.url = url
        try:
            models = self.client.models()
        except Exception as error:  # noqa: BLE001 - any failure here means there is nothing to evaluate
            raise TargetFailed(f"cannot reach {url}: {error}") from error
        self.model_name = models[0] if models else "unknown"
        self.resolved: dict[str, dict[str, Any]] = {}  # variant -> the options the server ran, from the trace

    def full_options(self, variant: Variant) -> dict[str, Any]:
        """The server's defaults are known once a request of the variant has come back (its trace lists them)."""
        known = self.resolved.get(variant.name)
        return {**known, **variant.sampling} if known else dict(variant.options)

    def _ask(self, job: Job) -> Outcome:
        import httpx
        from relat_client import RelatError

        options = {"max_tokens": job.max_tokens, "temperature": 0.0, **job.variant.options}
        for attempt in range(RETRIES + 1):
            started = time.perf_counter()
            try:
                result = self.client.ask(job.prompt, **options) if job.continuations is None else \
                    self._score(job)
            except RelatError as error:
                if error.status in RETRY_STATUSES and attempt < RETRIES:
                    time.sleep(float(error.retry_after or 2 ** attempt))
                    continue
                if error.status in RETRY_STATUSES or error.status >= 500:
                    raise TargetFailed(f"{job.request_id}: server error {error.status}: {error.message}") from error
                return Outcome(time.perf_counter() - started, error=f"{error.status}: {error.message}")
            except httpx.HTTPError as error:
                if attempt < RETRIES:
                    time.sleep(2 ** attempt)
                    continue
                raise TargetFailed(f"{job.request_id}: {type(error).__name__}: {error}") from error
            seconds = time.perf_counter() - started
            self.resolved.setdefault(job.variant.name, result.get("trace", {}).get("options") or {})
            return Outcome(seconds, result=result)
        raise AssertionError("unreachable")  # pragma: no cover

    def _score(self, job: Job) -> dict[str, Any]:
        """--mc-scoring loglik through POST /v1/completions: the options as relat.continuations, scored after one
        training; the result in /v1/relat's shape, with each option's score."""
        from relat_client import RelatError

        body = {"prompt": job.prompt, "temperature": 0.0, "logprobs": 0, **job.variant.sampling,
                "relat": {**job.variant.ttt, "continuations": list(job.continuations)}}
        response = self.client.http.post("/v1/completions", json=body)
        if response.status_code >= 400:
            try:
                error = response.json()
            except ValueError:
                error = response.text
            raise RelatError.from_body(response.status_code, error, response.headers)
        reply = response.json()
        options = [_option(choice["text"], choice["logprobs"]["token_logprobs"]) for choice in reply["choices"]]
        best = max(options, key=lambda option: option["logprob"])
        trace = {key: value for key, value in reply["relat"].items() if key != "ignored_fields"}
        return {"answer": best["text"], "finish_reason": "length", "usage": reply["usage"], "trace": trace,
                "options": options}

    def run(self, jobs: list[Job]) -> Iterator[tuple[Job, Outcome]]:
        todo = deque(jobs)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="relat-eval")
        running: dict[Future, Job] = {}
        try:
            while todo or running:
                while todo and len(running) < self.concurrency:
                    job = todo.popleft()
                    running[pool.submit(self._ask, job)] = job
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield running.pop(future), future.result()
        finally:  # stopped (Ctrl-C, a TargetFailed, the consumer gone): start nothing more, wait for nothing
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.client.close()
