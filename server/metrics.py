"""Prometheus metrics for the CacheBlend server.

Names follow vLLM's (`vllm:time_to_first_token_seconds`, ...) under the `cacheblend:` prefix.
Every series carries `model_name`; latency histograms and the reuse counters also carry
`mode` (full_prefill | prefix_cache | full_reuse | cacheblend), since comparing modes is the
point of the server. Exposed names (counters get `_total`, histograms `_bucket/_sum/_count`):

Histograms
  cacheblend:time_to_first_token_seconds{model_name,mode}
  cacheblend:inter_token_latency_seconds{model_name,mode}
  cacheblend:e2e_request_latency_seconds{model_name,mode}
  cacheblend:request_queue_time_seconds{model_name,mode}
  cacheblend:ttft_phase_seconds{model_name,mode,phase}   phase: kv_fetch|selection|recompute|first_decode
  cacheblend:quality_kl_divergence{model_name}           KL(full_prefill || served) of sampled requests
  cacheblend:quality_output_f1{model_name}               token F1 of the two greedy answers
Counters
  cacheblend:requests_total{model_name,status}            status: ok|error|aborted|rejected
  cacheblend:tenant_requests_total{model_name,tenant,status}  as requests_total, plus status limited
                                                          (429: over the tenant's requests in flight);
                                                          tenant: a name from the keys table or
                                                          "default" (a bounded set; never a key)
  cacheblend:request_success_total{model_name,finished_reason}
  cacheblend:prompt_tokens_total{model_name}
  cacheblend:generation_tokens_total{model_name}
  cacheblend:tokens_reused_total{model_name,mode}
  cacheblend:tokens_recomputed_total{model_name,mode}
  cacheblend:prompt_tokens_cached_total{model_name,source}  source: exact|chunk|turn (KV before any recompute)
  cacheblend:chunk_hits_total{model_name,tier}            request view: where a needed chunk was found
  cacheblend:chunk_misses_total{model_name}               request view: chunks found nowhere (computed)
  cacheblend:kv_hits_total{model_name,tier}               store view: lookups per tier (a lower tier
  cacheblend:kv_misses_total{model_name,tier}               is asked only after the upper ones missed)
  cacheblend:kv_bytes_loaded_total{model_name,tier}
  cacheblend:kv_bytes_stored_total{model_name,tier}
  cacheblend:kv_load_seconds_total{model_name,tier}
  cacheblend:kv_evictions_total{model_name,tier}
  cacheblend:kv_corrupt_blobs_total{model_name,tier}
  cacheblend:kv_remote_errors_total{model_name,tier}
  cacheblend:quality_samples_total{model_name}
  cacheblend:quality_top1_agreement_total{model_name}     agreement rate = this / quality_samples_total
  cacheblend:controller_decisions_total{model_name,direction}   direction: up|down|hold
Gauges
  cacheblend:num_requests_running{model_name}
  cacheblend:num_requests_waiting{model_name}
  cacheblend:kv_bytes_used{model_name,tier}
  cacheblend:kv_capacity_bytes{model_name,tier}
  cacheblend:kv_entries{model_name,tier}
  cacheblend:recompute_ratio{model_name}

Rates are two counters, never a gauge (vLLM's rule): the top-1 agreement rate and hit rates are
computed in PromQL from counter pairs, so they aggregate correctly across replicas and windows.

Single process by design: each `Metrics` has its own `CollectorRegistry` (so tests can build
several) and prometheus-client's multiprocess mode is not supported. The server runs one uvicorn
worker per replica because the engine owns the model and its KV store in that process; capacity
scales by adding replicas behind the load balancer, each scraped on its own /metrics.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from engine.stats import STATUSES, RequestStats

# `_created` samples double the series count and no dashboard uses them.
disable_created_metrics()

# vLLM's buckets for TTFT; also used for the TTFT phases, which are parts of it.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# vLLM's inter-token buckets with three below 10 ms: a 135M model decodes faster than that on GPU.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# vLLM's request-latency buckets with sub-300 ms ones in front: short answers from a small
# model finish (and wait in the queue) well under vLLM's first bucket.
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5,
                           5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                           480.0, 960.0, 1920.0, 7680.0)
KL_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
F1_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

PHASES = ("kv_fetch", "selection", "recompute", "first_decode")
DIRECTIONS = ("up", "down", "hold")
CACHE_SOURCES = ("exact", "chunk", "turn")  # where a prompt token's KV came from

# Store stats key -> counter attribute; the store reports running totals.
_STORE_COUNTERS = {
    "hits": "kv_hits",
    "misses": "kv_misses",
    "bytes_read": "kv_bytes_loaded",
    "bytes_written": "kv_bytes_stored",
    "load_seconds": "kv_load_seconds",
    "evictions": "kv_evictions",
    "corrupt": "kv_corrupt_blobs",
    "errors": "kv_remote_errors",
}
# Store stats key -> gauge attribute; current values, set as they are.
_STORE_GAUGES = {
    "bytes_used": "kv_bytes_used",
    "capacity": "kv_capacity_bytes",
    "entries": "kv_entries",
}

_P = "cacheblend:"


class Metrics:
    """All server metrics for one served model, in a registry of their own."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._store_last: dict[tuple[str, str], float] = {}

        def hist(name, doc, labels, buckets):
            return Histogram(_P + name, doc, ["model_name", *labels], buckets=buckets, registry=self.registry)

        def counter(name, doc, labels=()):
            return Counter(_P + name, doc, ["model_name", *labels], registry=self.registry)

        def gauge(name, doc, labels=()):
            return Gauge(_P + name, doc, ["model_name", *labels], registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token", ["mode"], TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Gap between consecutive output tokens", ["mode"], ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Request latency, arrival to last token", ["mode"], REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time waiting before prefill", ["mode"], REQUEST_LATENCY_BUCKETS)
        self.ttft_phase = hist("ttft_phase_seconds", "TTFT split into kv_fetch, selection, recompute, first_decode",
                               ["mode", "phase"], TTFT_BUCKETS)
        self.quality_kl = hist("quality_kl_divergence", "KL(full_prefill || served) on sampled requests", [], KL_BUCKETS)
        self.quality_f1 = hist("quality_output_f1", "Token F1 between full_prefill and served greedy answers", [], F1_BUCKETS)

        self.requests = counter("requests", "Requests by outcome", ["status"])
        self.tenant_requests = counter("tenant_requests", "Requests by tenant and outcome", ["tenant", "status"])
        self.request_success = counter("request_success", "Successfully finished requests", ["finished_reason"])
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.tokens_reused = counter("tokens_reused", "Prompt tokens whose KV came from a cache", ["mode"])
        self.tokens_recomputed = counter("tokens_recomputed", "Prompt tokens whose KV was computed", ["mode"])
        self.prompt_tokens_cached = counter("prompt_tokens_cached", "Prompt tokens whose KV came from this source "
                                            "(exact prefix, chunk, earlier turn), before any recompute", ["source"])
        self.chunk_hits = counter("chunk_hits", "Chunks a request needed, by the tier they were found in", ["tier"])
        self.chunk_misses = counter("chunk_misses", "Chunks a request needed that no tier held")
        self.kv_hits = counter("kv_hits", "Store lookups answered by this tier", ["tier"])
        self.kv_misses = counter("kv_misses", "Store lookups this tier could not answer", ["tier"])
        self.kv_bytes_loaded = counter("kv_bytes_loaded", "Chunk KV bytes read from this tier", ["tier"])
        self.kv_bytes_stored = counter("kv_bytes_stored", "Chunk KV bytes written to this tier", ["tier"])
        self.kv_load_seconds = counter("kv_load_seconds", "Seconds spent reading from this tier", ["tier"])
        self.kv_evictions = counter("kv_evictions", "Entries evicted from this tier", ["tier"])
        self.kv_corrupt_blobs = counter("kv_corrupt_blobs", "Blobs that failed validation on read", ["tier"])
        self.kv_remote_errors = counter("kv_remote_errors", "Failed operations against this tier", ["tier"])
        self.quality_samples = counter("quality_samples", "Requests re-run with full_prefill to measure quality")
        self.quality_top1_agreement = counter("quality_top1_agreement", "Sampled requests whose top-1 token agreed")
        self.controller_decisions = counter("controller_decisions", "Recompute-ratio controller decisions", ["direction"])

        self.running = gauge("num_requests_running", "Requests in the running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to run")
        self.kv_bytes_used = gauge("kv_bytes_used", "Bytes held by this tier", ["tier"])
        self.kv_capacity_bytes = gauge("kv_capacity_bytes", "Capacity of this tier in bytes", ["tier"])
        self.kv_entries = gauge("kv_entries", "Chunks held by this tier", ["tier"])
        self.recompute_ratio = gauge("recompute_ratio", "Current CacheBlend recompute ratio")

        # Series whose label values are all known up front start at 0, so rate() and the
        # dashboards see them before the first event rather than "no data".
        m = model_name
        for status in STATUSES:
            self.requests.labels(m, status)
        for direction in DIRECTIONS:
            self.controller_decisions.labels(m, direction)
        for source in CACHE_SOURCES:
            self.prompt_tokens_cached.labels(m, source)
        for metric in (self.prompt_tokens, self.generation_tokens, self.chunk_misses, self.quality_samples,
                       self.quality_top1_agreement, self.quality_kl, self.quality_f1, self.running, self.waiting):
            metric.labels(m)

    def observe_request(self, stats: RequestStats) -> None:
        """Record one finished (or refused) request. Fields left None (a rejected request has
        no timings) are skipped; without a mode only the status and token totals are recorded."""
        m = self.model_name
        self.requests.labels(m, stats.status).inc()
        if stats.status == "ok" and stats.finish_reason:
            self.request_success.labels(m, stats.finish_reason).inc()

        _inc(self.prompt_tokens.labels(m), stats.prompt_tokens)
        _inc(self.generation_tokens.labels(m), stats.completion_tokens)

        mode = stats.mode
        if mode is None:  # refused before a mode was chosen: nothing mode-specific to record
            return
        # Both reuse counters exist for every mode seen, so reused/(reused+recomputed) matches.
        _inc(self.tokens_reused.labels(m, mode), stats.tokens_reused)
        _inc(self.tokens_recomputed.labels(m, mode), stats.tokens_recomputed)
        for source in CACHE_SOURCES:
            _inc(self.prompt_tokens_cached.labels(m, source), getattr(stats, f"{source}_tokens"))
        for tier, n in stats.chunk_hits.items():
            _inc(self.chunk_hits.labels(m, tier), n)
        _inc(self.chunk_misses.labels(m), stats.chunk_misses)

        _observe(self.queue_time, (m, mode), stats.queue_s)
        _observe(self.ttft, (m, mode), stats.ttft_s)
        _observe(self.e2e, (m, mode), stats.e2e_s)
        for phase in PHASES:
            _observe(self.ttft_phase, (m, mode, phase), getattr(stats, f"{phase}_s"))
        for gap in stats.itl_s:
            self.itl.labels(m, mode).observe(gap)

    def observe_tenant(self, tenant: str, status: str) -> None:
        """Count one request of `tenant` (a table name, never a key) by its outcome."""
        if status not in STATUSES + ("limited",):
            raise ValueError(f"unknown request status {status!r}")
        self.tenant_requests.labels(self.model_name, tenant, status).inc()

    def set_queue(self, running: int, waiting: int) -> None:
        """Set the current number of running and waiting requests."""
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def observe_store(self, stats: Mapping[str, Mapping[str, float]]) -> None:
        """Take the chunk store's `stats()`: {tier: {hits, misses, bytes_read, bytes_written,
        evictions, corrupt, errors, load_seconds, bytes_used, capacity, entries}}.

        Counter keys are the store's running totals; each call adds the increase since the
        previous call (a total that went down means the store was rebuilt, so all of it is
        new). Gauge keys are set as they are. Missing keys are skipped, unknown keys ignored.
        A tier seen for the first time gets all its counters at 0, so its dashboard rows exist.
        """
        m = self.model_name
        with self._lock:  # called from both the engine and the /metrics handler
            for tier, values in stats.items():
                for key, attr in _STORE_COUNTERS.items():
                    child = getattr(self, attr).labels(m, tier)
                    total = values.get(key)
                    if total is None:
                        continue
                    last = self._store_last.get((tier, key), 0)
                    child.inc(total - last if total >= last else total)
                    self._store_last[(tier, key)] = total
                for key, attr in _STORE_GAUGES.items():
                    if values.get(key) is not None:
                        getattr(self, attr).labels(m, tier).set(values[key])

    def observe_quality(self, kl: float, top1_agree: float, f1: float) -> None:
        """Record one quality sample (the request re-run with full_prefill).

        `top1_agree` is a bool, or the share of compared positions whose top-1 tokens agreed;
        the agreement counter grows by it, so agreement_total / samples_total is the mean.
        """
        m = self.model_name
        self.quality_samples.labels(m).inc()
        self.quality_top1_agreement.labels(m).inc(float(top1_agree))
        self.quality_kl.labels(m).observe(kl)
        self.quality_f1.labels(m).observe(f1)

    def set_ratio(self, ratio: float) -> None:
        """Set the recompute ratio now in force (call at start-up and on every change)."""
        self.recompute_ratio.labels(self.model_name).set(ratio)

    def controller_decision(self, direction: str) -> None:
        """Count one controller decision: 'up', 'down' or 'hold'."""
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown controller direction {direction!r}")
        self.controller_decisions.labels(self.model_name, direction).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type, for the /metrics route."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _inc(child: Any, amount: Optional[float]) -> None:
    if amount:
        child.inc(amount)


def _observe(hist: Histogram, labels: tuple[str, ...], value: Optional[float]) -> None:
    # The child is made only with a value, so a phase a mode never has shows no series.
    if value is not None:
        hist.labels(*labels).observe(value)
