"""Prometheus metrics, every one labelled by model, times in seconds.

Per-request figures (time to first token, time per output token, end-to-end latency, token counts) are recorded
when a request ends; engine state (queue length, running sequences, KV-cache usage, preemptions) is read from
each loaded engine at scrape time, so it is never stale.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
PREFIX = "infer_recipes"


class _EngineCollector:
    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        waiting = GaugeMetricFamily(f"{PREFIX}_num_requests_waiting", "Requests queued, not yet running",
                                    labels=["model"])
        running = GaugeMetricFamily(f"{PREFIX}_num_requests_running", "Sequences in the running batch",
                                    labels=["model"])
        usage = GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1)",
                                  labels=["model"])
        free = GaugeMetricFamily(f"{PREFIX}_kv_cache_free_blocks", "KV-cache blocks free", labels=["model"])
        total = GaugeMetricFamily(f"{PREFIX}_kv_cache_total_blocks", "KV-cache blocks in the pool", labels=["model"])
        kv_bytes = GaugeMetricFamily(f"{PREFIX}_kv_cache_bytes", "Bytes reserved for the KV pool (its dtype's, "
                                     "an int8 pool's scales included)", labels=["model"])
        kv_token = GaugeMetricFamily(f"{PREFIX}_kv_cache_bytes_per_token", "Bytes one token's keys and values take "
                                     "in the pool", labels=["model"])
        loaded = GaugeMetricFamily(f"{PREFIX}_model_loaded", "1 when the model is in memory", labels=["model"])
        memory = GaugeMetricFamily(f"{PREFIX}_model_memory_bytes", "Weights plus KV pool of a loaded model",
                                   labels=["model"])
        preemptions = CounterMetricFamily(f"{PREFIX}_num_preemptions", "Sequences preempted (recomputed later)",
                                          labels=["model"])
        queries = CounterMetricFamily(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels=["model"])
        hits = CounterMetricFamily(f"{PREFIX}_prefix_cache_hits", "Prompt tokens found in the prefix cache (not "
                                   "computed again)", labels=["model"])
        drafted = CounterMetricFamily(f"{PREFIX}_spec_decode_draft_tokens", "Guessed tokens verified "
                                      "(speculative decoding)", labels=["model"])
        accepted = CounterMetricFamily(f"{PREFIX}_spec_decode_accepted_tokens", "Guessed tokens the model kept "
                                       "(speculative decoding)", labels=["model"])
        for name, entry in self.pool.entries.items():
            loaded.add_metric([name], 1.0 if entry.loaded else 0.0)
            if entry.engine is None:
                continue
            stats = entry.engine.llm_engine.stats()
            waiting.add_metric([name], stats["waiting"])
            running.add_metric([name], stats["running"])
            usage.add_metric([name], stats["kv_cache_usage"])
            free.add_metric([name], stats["kv_blocks_free"])
            total.add_metric([name], stats["kv_blocks_total"])
            memory.add_metric([name], entry.nbytes)
            kv_bytes.add_metric([name], entry.llm.kv_cache_bytes())
            kv_token.add_metric([name], entry.llm.kv_bytes_per_token())
            preemptions.add_metric([name], stats["preemptions"])
            queries.add_metric([name], stats["prefix_cache_queries"])
            hits.add_metric([name], stats["prefix_cache_hits"])
            drafted.add_metric([name], stats["spec_draft_tokens"])
            accepted.add_metric([name], stats["spec_accepted_tokens"])
        yield from (waiting, running, usage, free, total, kv_bytes, kv_token, loaded, memory, preemptions, queries,
                    hits, drafted, accepted)


class Metrics:
    def __init__(self, pool):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request", ["model"], buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "End-to-end request latency", ["model"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Finished requests by finish reason", ["model", "finish_reason"],
                                registry=r)
        r.register(_EngineCollector(pool))
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co: what a soak run watches for growth

    def record(self, model: str, metrics: dict, finish_reason: str | None) -> None:
        """One finished sequence (its RequestOutput.metrics)."""
        if "ttft_s" in metrics:
            self.ttft.labels(model).observe(metrics["ttft_s"])
        if "tpot_s" in metrics:
            self.tpot.labels(model).observe(metrics["tpot_s"])
        if "e2e_s" in metrics:
            self.e2e.labels(model).observe(metrics["e2e_s"])
        self.prompt_tokens.labels(model).inc(metrics.get("prompt_tokens", 0))
        self.generation_tokens.labels(model).inc(metrics.get("generated_tokens", 0))
        self.requests.labels(model, finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
