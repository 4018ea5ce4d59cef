"""The per-app service and its life cycle: settings, metrics, the engine's runner, and the phase.

Life of the app: it listens at once and loads the model in a thread (`Service.load`: `/health` 200, `/ready` 503
until it is loaded); SIGTERM (through `Service.drain`, called by `relat serve`) turns `/ready` to 503 and refuses
new work while in-flight requests finish. Everything per app lives on `app.state.service` (server/app.py), so tests
can run several apps. The checks a request meets before it is queued are here too (`Service.submit`).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import weakref
from collections.abc import Callable
from typing import Any

from relat_core import (
    AdapterCache,
    AgentPrompts,
    Engine,
    InvalidParameter,
    Request,
    Result,
    SamplingParams,
    TTTParams,
    load_model,
    weights_digest,
)
from relat_core.export import adapter_bytes

from .access_log import AccessLog, RequestRecord
from .adapters import AdapterStore
from .errors import (
    BadRequest,
    ContextLengthExceeded,
    ErrorInfo,
    ModelNotFound,
    PromptTooLong,
    Unauthorized,
    Unavailable,
)
from .metrics import Metrics
from .protocol import ServerDefaults, engine_request, now, request_models
from .runner import Job, Runner
from .settings import Settings
from .tenants import ANONYMOUS, Tenant
from .tools import ToolTemplate

SAMPLING_PARAMS = frozenset(field.name for field in dataclasses.fields(SamplingParams))
# The engine's errors that name a top-level field (the others are TTT options: in chat, relat.NAME).
TOP_LEVEL_PARAMS = SAMPLING_PARAMS | {"response_format", "tools", "tool_choice"}

log = logging.getLogger("relat_server")


def default_loader(settings: Settings) -> Callable[[], Engine]:
    def load() -> Engine:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        # Before the model: a prompts file that went bad since the settings checked it fails in a moment.
        prompts = AgentPrompts.load(settings.agent_prompts) if settings.agent_prompts else None
        loaded = load_model(settings.model, settings.device, settings.dtype, name=settings.served_model_name,
                            pack_weights=settings.pack_weights, weights=settings.weights)
        cache = AdapterCache(settings.adapter_cache_entries, settings.adapter_cache_bytes)
        return Engine(loaded, max_rank=settings.max_rank, num_slots=settings.max_concurrency, agent_prompts=prompts,
                      adapter_cache=cache)

    return load


class Service:
    """The per-app state: settings, metrics, the engine's runner, and the phase (loading/ready/draining/failed)."""

    def __init__(self, settings: Settings, load_engine: Callable[[], Engine]):
        self.settings = settings
        self.metrics = Metrics()
        self.phase = "loading"
        self.created = now()
        self._load_engine = load_engine
        # Every key's digest and its tenant (server/tenants.py): --api-key keys are `default`, a keys file names more.
        self.tenants = settings.tenants()
        self.access_log = AccessLog(settings.access_log, settings.log_prompts)
        # The tenant and access-log record of each engine request in flight, by id(Request) (the runner's on_result
        # gives back the job, hence the Request). Registered before the job is queued, so the result cannot arrive
        # first; an entry leaves with its result, or with the Request when there is none.
        self._callers: dict[int, tuple[Tenant, RequestRecord | None]] = {}
        self.models = request_models(settings.limits(), settings.answers_limit)
        self.context_length: int | None = None  # prompt + answer, in tokens; known once the model is loaded
        self.runner: Runner | None = None
        self.defaults: ServerDefaults | None = None
        self.model_name = settings.served_model_name or ""
        self.family = ""  # the loaded model's architecture (Engine.family)
        self.tokenizer: Any = None
        self.tool_template = ToolTemplate()  # what the chat template does with tools (tools.py)
        self.base_digest: str | None = None  # the base weights' SHA-256 once loaded, for GET /admin/status
        self.adapters = AdapterStore(settings.max_adapters, settings.adapter_ttl, settings.max_adapter_bytes)
        # `relat serve` sets this to stop the process when the model cannot be loaded or the engine dies.
        self.on_fatal: Callable[[], None] | None = None

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        runner = Runner(self._load_engine, self.metrics, self.settings.max_queue, self.settings.max_concurrency,
                        self.settings.batch_window, on_death=lambda _: loop.call_soon_threadsafe(self._fail),
                        on_result=self.on_result, tenants=tuple(self.tenants.tenants),
                        tenant_reserve=self.settings.tenant_reserve_places(len(self.tenants.tenants)))
        try:
            engine = await runner.start()  # loaded on the thread that will run it
            defaults = self._defaults(engine)
            # Off the engine's thread and the event loop (hashlib releases the GIL): about 1 s per GB of weights.
            self.base_digest = await asyncio.to_thread(weights_digest, engine.model)
            await asyncio.to_thread(lambda: engine.grammars)  # structured outputs: built at start-up, not per request
        except Exception:
            log.exception("cannot load the model")
            await asyncio.to_thread(runner.stop)
            self._fail()
            return
        self.defaults = ServerDefaults(defaults, self.settings.sampling_defaults())
        # The engine's thread uses its tokenizer; a fast tokenizer must not be used by two threads at once.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.tool_template = ToolTemplate.of(engine.tokenizer.chat_template, engine.chat.supports_tools)
        self.model_name = self.settings.served_model_name or engine.name
        self.family = engine.family
        self.context_length = self._context_length(engine)
        self.runner = runner
        self.phase = "ready"
        log.info("serving %s; default TTT parameters: %s", self.model_name, defaults)

    def _fail(self) -> None:
        """The model could not be loaded or the engine's thread died: /health turns 503 and the process stops."""
        self.phase = "failed"
        if self.on_fatal is not None:
            self.on_fatal()

    def _defaults(self, engine: Engine) -> TTTParams:
        """The engine's defaults for the model with the operator's settings applied, within the server's limits:
        a request that leaves a field out must not be given more than it may ask for."""
        defaults = engine.defaults.replace(**self.settings.ttt_fields())
        # Options the model cannot take (a Huginn option on another model, targets it lacks) stop the start-up
        # here, naming the setting, rather than failing every request.
        # With logprobs: a default logprob_shift applies to the requests that ask for them (engine_request).
        engine.check(Request([{"role": "user", "content": "?"}], defaults, SamplingParams(logprobs=True)))
        over = {name: limit for name, limit in self.settings.limits().items()
                if getattr(defaults, name) is not None and getattr(defaults, name) > limit}
        if over:
            log.warning("the model's defaults (%s) exceed this server's limits; using the limits",
                        ", ".join(f"{name} {getattr(defaults, name)}" for name in over))
            defaults = defaults.replace(**over)
        return defaults

    def _context_length(self, engine: Engine) -> int | None:
        """The model's context (max_position_embeddings), or the max_model_len setting below it."""
        model = getattr(engine.model.config, "max_position_embeddings", None)
        setting = self.settings.max_model_len
        if setting is not None and model is not None and setting > model:
            log.warning("max_model_len %d is over the model's context of %d tokens; using %d", setting, model, model)
        return min((n for n in (model, setting) if n is not None), default=None)

    async def drain(self) -> None:
        """Refuse new requests and wait for in-flight ones, up to the drain timeout; then cancel what is left,
        so that its clients get an error event (503) instead of a stream cut off by the shutdown."""
        if self.phase == "ready":
            self.phase = "draining"
        if self.runner is not None:
            log.info("draining: waiting up to %.0f s for in-flight requests", self.settings.drain_timeout)
            if not await self.runner.drain(self.settings.drain_timeout):
                log.warning("drain timeout: cancelling the requests still in flight")
                await self.stop()

    async def stop(self) -> None:
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        self.access_log.close()

    # -- request checks, in the order a request meets them -------------------------------------------------

    @property
    def has_keys(self) -> bool:
        return self.tenants.has_keys

    def authorize(self, header: bytes) -> Tenant:
        """The tenant of `Bearer <key>`; Unauthorized unless the key is one of the server's. The key is never logged
        or echoed, and every digest is compared (TenantDirectory.find): the time says nothing of which came close."""
        scheme, _, token = header.partition(b" ")
        tenant = self.tenants.find(token.strip())
        if scheme.lower() != b"bearer" or tenant is None:
            raise Unauthorized("missing or invalid API key; send Authorization: Bearer <key>")
        return tenant

    def check_ready(self) -> None:
        reasons = {"loading": "the model is still loading", "draining": "the server is shutting down",
                   "failed": "the engine failed"}
        if self.phase != "ready":
            raise Unavailable(reasons[self.phase])

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ModelNotFound(f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                                param="model")

    def check_prompt(self, messages: list[dict], prompt: str | list[int] | None = None,
                     tools: list[dict] | None = None) -> int:
        """The prompt's length in tokens (the messages through the chat template, or a raw prompt as the engine
        reads it); 413 past max_prompt_tokens or with no room left for an answer."""
        if prompt is None:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=True)
            count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            count = len(prompt) if isinstance(prompt, list) else len(self.tokenizer(prompt)["input_ids"])
        param = "messages" if prompt is None else "prompt"
        limit = self.settings.max_prompt_tokens
        if count > limit:
            raise PromptTooLong(f"the prompt has {count} tokens; this server accepts at most {limit}", param=param)
        if self.context_length is not None and count >= self.context_length:
            raise PromptTooLong(f"the prompt has {count} tokens; the model's context is {self.context_length}",
                                param=param)
        return count

    def fit_context(self, request: Request, prompt_tokens: int, sent: bool, param: str) -> Request:
        """The answer within the context the prompt leaves, as vLLM has it: a request that asks for more is a 400;
        the server's default length is cut to fit."""
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if room is None or request.sampling.max_tokens <= room:
            return request
        if sent:
            raise ContextLengthExceeded(
                f"the model's context is {self.context_length} tokens: the prompt's {prompt_tokens} leave {room} "
                f"for the answer, and {param} asks for {request.sampling.max_tokens}", param=param)
        return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=room))

    def submit(self, request_id: str, messages: list[dict], ttt_fields: dict, sampling_fields: dict,
               timeout: float | None, ttt_prefix: str, max_tokens_param: str, return_adapter: bool = False,
               prompt: str | list[int] | None = None, continuations: list[str] | None = None,
               max_tokens_sent: bool | None = None, tools: list[dict] | None = None,
               tenant: Tenant = ANONYMOUS, cache_salt: str | None = None,
               record: RequestRecord | None = None) -> Job:
        """Validate a request's parameters, prompt and length, then queue it (the deadline: at most the server's).
        A legacy completion (server/completions.py) sends a raw `prompt` instead of messages, and may send
        continuations to score; max_tokens_sent says whether its length was the client's (else it is cut to fit).
        The tenant (with the request's cache_salt) partitions the adapter cache and owns an exported adapter; the
        record (its HTTP request's, for the access log) gets the result."""
        assert self.runner is not None and self.defaults is not None
        request = engine_request(messages, ttt_fields, sampling_fields, self.defaults, ttt_prefix, return_adapter)
        request.cache_partition = cache_partition(tenant, cache_salt)
        if prompt is not None:
            request = dataclasses.replace(request, messages=None, prompt=prompt, continuations=continuations)
        request.tools = tools  # rendered by the chat template (server/tools.py)
        if return_adapter and not self.adapters.enabled:
            raise BadRequest("this server keeps no adapters (max_adapters is 0)", param=ttt_prefix + "return_adapter")
        try:
            messages = self.runner.engine.check(request)
        except InvalidParameter as error:
            if error.param.startswith(("messages", "prompt")) or error.param in TOP_LEVEL_PARAMS:
                raise
            raise InvalidParameter(ttt_prefix + error.param, str(error)) from None
        if return_adapter:
            size = adapter_bytes(self.runner.engine.bank, request.ttt.rank, request.ttt.targets)
            if size > self.adapters.max_bytes:
                raise BadRequest(f"this adapter would take {size} bytes; this server keeps at most "
                                 f"{self.adapters.max_bytes} (max_adapter_bytes)", param=ttt_prefix + "return_adapter")
        prompt_tokens = self.check_prompt(messages, prompt, tools)
        sent = sampling_fields["max_tokens"] is not None if max_tokens_sent is None else max_tokens_sent
        request = self.fit_context(request, prompt_tokens, sent, max_tokens_param)
        deadline = min(timeout or self.settings.request_timeout, self.settings.request_timeout)
        if record is not None and self.access_log.log_prompts:
            record.prompts.append(messages if prompt is None else prompt)
        key = id(request)
        self._callers[key] = (tenant, record)
        weakref.finalize(request, self._callers.pop, key, None)  # one that never finishes leaves with its Request
        return self.runner.submit(request_id, request, deadline, tenant)  # its queue, share and limits

    def on_result(self, result: Result, job: Job) -> None:
        """On the engine's thread, as a request finishes (before its route can answer): keep its exported adapter
        for its tenant, count it for its tenant, and add it to its HTTP request's access-log record."""
        tenant, record = self._callers.pop(id(job.request))
        self.keep_adapter(result, tenant)
        self.count_tenant(tenant, result)
        if record is not None:
            record.add(result, self.access_log.log_prompts)

    def keep_adapter(self, result: Result, tenant: Tenant) -> None:
        """Keep a result's exported adapter, its tenant's alone, and say in the trace where."""
        if result.adapter is not None:
            kept = self.adapters.put(result.adapter, tenant.name)
            result.adapter = None  # the store holds it now
            result.trace.adapter = {**(result.trace.adapter or {}), **kept.reference()}

    def count_tenant(self, tenant: Tenant, result: Result) -> None:
        """A finished request's tokens and training time under its tenant's name (never its key)."""
        metrics, name = self.metrics, tenant.name
        metrics.tenant_tokens.labels(name, "prompt").inc(result.usage.prompt_tokens)
        metrics.tenant_tokens.labels(name, "completion").inc(result.usage.completion_tokens)
        if result.trace.cache != "hit":  # a hit trained nothing: its time was counted when its adapter trained
            metrics.tenant_train_seconds.labels(name).inc(result.trace.timings.get("train_s", 0.0))

    def count_error(self, info: ErrorInfo) -> None:
        self.metrics.errors.labels(str(info.status)).inc()


def cache_partition(tenant: Tenant, cache_salt: str | None) -> str:
    """The adapter cache's partition of a tenant's request (relat_core sees an opaque string): JSON, so that no
    name and salt can spell another pair's partition."""
    return json.dumps([tenant.name, cache_salt])
