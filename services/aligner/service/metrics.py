"""Prometheus metrics of the aligner service, in a registry of its own (served at REST /metrics)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class AlignerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._add_request_metrics(self.registry)
        self._add_block_metrics(self.registry)
        self._add_teacher_metrics(self.registry)

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        """Requests by transport (counted by the data plane and the transports' error hooks)."""
        self.requests = Counter(
            "fuseserve_aligner_requests",
            "requests by transport and outcome",
            ["transport", "outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "fuseserve_aligner_request_seconds",
            "request latency",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.openai_positions = Counter(
            "fuseserve_aligner_openai_positions",
            "positions answered by /v1/completions, by where the actual token's probability "
            "came from: listed (the fused row), tail (its share of the row's tail), zero "
            "(neither: written as -9999.0)",
            ["actual"],
            registry=r,
        )

    def _add_block_metrics(self, r: CollectorRegistry) -> None:
        """Blocks, the cache and this process's work."""
        self.blocks = Counter(
            "fuseserve_aligner_blocks",
            "blocks answered, by source: hit (fused cache), shared (identical request in "
            "flight), computed",
            ["source"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "fuseserve_aligner_cache_lookups",
            "cache lookups by level (fused|scores) and result (hit|miss|corrupt)",
            ["level", "result"],
            registry=r,
        )
        self.cache_errors = Counter(
            "fuseserve_aligner_cache_errors",
            "cache backend failures by operation (served uncached)",
            ["op"],
            registry=r,
        )
        self.cache_up = Gauge(
            "fuseserve_aligner_cache_up",
            "1 while the cache answers (Redis: its latest command succeeded); 0 while it fails",
            registry=r,
        )
        self.fuse_seconds = Histogram(
            "fuseserve_aligner_fuse_seconds",
            "alignment + fusion CPU time per block (teacher time excluded)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.inflight = Gauge(
            "fuseserve_aligner_inflight_blocks", "blocks being answered", registry=r
        )
        self.loop_lag = Histogram(
            "fuseserve_aligner_event_loop_lag_seconds",
            "how late the event loop woke from a short sleep: what any request (a refusal "
            "too) waits before this process reads it (CPU starvation, GIL, blocking work)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )

    def _add_teacher_metrics(self, r: CollectorRegistry) -> None:
        """The teachers as this aligner sees them."""
        self.teacher_calls = Counter(
            "fuseserve_aligner_teacher_calls",
            "teacher Score calls by teacher and outcome",
            ["teacher", "outcome"],
            registry=r,
        )
        self.teacher_latency = Histogram(
            "fuseserve_aligner_teacher_seconds",
            "teacher Score call latency",
            ["teacher"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shed = Counter(
            "fuseserve_aligner_shed_total",
            "requests refused (429) because a teacher could not answer them within "
            "request_deadline_s",
            ["teacher"],
            registry=r,
        )
        self.teacher_ready = Gauge(
            "fuseserve_aligner_teacher_ready", "1 when a teacher is usable", ["teacher"], registry=r
        )


async def sample_loop_lag(histogram: Histogram, interval_s: float = 0.1) -> None:
    """Forever: sleep ``interval_s`` and observe how much later than asked the loop woke."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(interval_s)
        histogram.observe(max(0.0, time.perf_counter() - start - interval_s))
