"""Prometheus metrics, prefix `relat_`, named after vLLM's `vllm:` metrics where one exists.

Each app owns its registry (tests run several apps in one process). Labels never carry a request, adapter or
user name: only the TTT method, the outcome, the HTTP status, the kind of an agent's turn and a gate and its
decision, all from small fixed sets, and the tenant's name (server/tenants.py), which the operator chose: never a
key.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relat_core.adapter_cache import CacheStats

OUTCOMES: tuple[str, ...] = ("success", "error", "cancelled", "timeout", "rejected")

# Seconds: from a millisecond decode step up to the 10-minute default deadline.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STEP_BUCKETS = (0, 1, 2, 3, 4, 5, 8, 10, 16, 25, 50, 100)
LOSS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("relat_requests", "Inference requests by TTT method and outcome",
                                ["method", "outcome"], registry=r)
        self.errors = Counter("relat_errors", "Error responses by HTTP status", ["code"], registry=r)
        self.queue_time = Histogram("relat_request_queue_time_seconds", "Time a request waited for the engine",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttt_time = Histogram("relat_ttt_time_seconds", "Test-time training time of a request",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.ttt_steps = Histogram("relat_ttt_steps", "Training steps a request ran", buckets=STEP_BUCKETS,
                                   registry=r)
        self.ttt_steps_run = Counter("relat_ttt_steps_run", "Training steps run, finished requests or not",
                                     registry=r)
        # The agents before the last (the last one's turn is the answer): "text" (TextMAS) or "latent" (LatentMAS).
        self.agent_turns_run = Counter("relat_agent_turns_run", "Agents' turns run before the answering agent's, "
                                       "by kind (text or latent), finished requests or not", ["kind"], registry=r)
        self.recon_before = Histogram("relat_recon_loss_before", "Reconstruction loss before training",
                                      buckets=LOSS_BUCKETS, registry=r)
        self.recon_after = Histogram("relat_recon_loss_after", "Reconstruction loss after training",
                                     buckets=LOSS_BUCKETS, registry=r)
        # A gated request (relat_core/engine/gating.py): did its gate train it or keep direct's answer?
        self.gate_decisions = Counter("relat_gate_decisions", "Gated requests by gate (fidelity, confidence, auto) "
                                      "and decision (trained, or kept direct's answer)", ["gate", "decision"],
                                      registry=r)
        self.ttft = Histogram("relat_time_to_first_token_seconds", "Arrival to first answer text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("relat_inter_token_latency_seconds", "Time between successive answer texts",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("relat_e2e_request_latency_seconds", "Arrival to the end of a successful request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("relat_prompt_tokens", "Prompt tokens of successful requests", registry=r)
        self.generation_tokens = Counter("relat_generation_tokens", "Generated tokens of successful requests",
                                         registry=r)
        self.running = Gauge("relat_requests_running", "Requests the engine is working on", registry=r)
        self.waiting = Gauge("relat_requests_waiting", "Requests queued for the engine", registry=r)
        self.slots = Gauge("relat_adapter_slots_in_use", "Adapter slots leased to requests", registry=r)
        self.cache_hits = Counter("relat_adapter_cache_hits", "Requests whose adapter came from the adapter cache",
                                  registry=r)
        self.cache_misses = Counter("relat_adapter_cache_misses", "Requests that trained after finding no cached "
                                    "adapter", registry=r)
        self.cache_evictions = Counter("relat_adapter_cache_evictions", "Adapters evicted from the adapter cache",
                                       registry=r)
        self.cache_bytes = Gauge("relat_adapter_cache_bytes", "Bytes the adapter cache holds", registry=r)
        self.cache_entries = Gauge("relat_adapter_cache_entries", "Adapters the adapter cache holds", registry=r)
        # Per tenant (server/tenants.py), labelled by its name, never its key. Requests, tokens and training time
        # count as a request finishes (Service.count_tenant); the 429s as the runner refuses one.
        self.tenant_requests = Counter("relat_tenant_requests", "Requests the engine finished, by tenant and outcome",
                                       ["tenant", "outcome"], registry=r)
        self.tenant_tokens = Counter("relat_tenant_tokens", "Tokens of finished requests, by tenant and kind (prompt "
                                     "or completion)", ["tenant", "kind"], registry=r)
        self.tenant_train_seconds = Counter("relat_tenant_train_seconds", "Test-time training seconds, by tenant",
                                            ["tenant"], registry=r)
        self.tenant_rejected = Counter("relat_tenant_rejected", "Requests refused with 429 (queue full or rate "
                                       "limit), by tenant and reason", ["tenant", "reason"], registry=r)
        self._cache_seen = CacheStats()

    def observe_cache(self, stats: CacheStats) -> None:
        """Bring the cache's metrics up to the engine's counts (read between engine steps, on the engine's thread)."""
        seen = self._cache_seen
        self.cache_hits.inc(stats.hits - seen.hits)
        self.cache_misses.inc(stats.misses - seen.misses)
        self.cache_evictions.inc(stats.evictions - seen.evictions)
        self.cache_bytes.set(stats.bytes)
        self.cache_entries.set(stats.entries)
        self._cache_seen = CacheStats(**vars(stats))
