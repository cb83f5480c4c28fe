"""Prometheus metrics of one teacher server, in a registry of its own (several share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TeacherMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "fuseserve_teacher_queue_depth", "sequences waiting to be scored", registry=r
        )
        self.batch_size = Histogram(
            "fuseserve_teacher_batch_sequences",
            "sequences per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.tokens = Counter("fuseserve_teacher_tokens_scored", "tokens scored", registry=r)
        self.dropped = Counter(
            "fuseserve_teacher_dropped_sequences",
            "queued sequences dropped unscored because their caller had gone",
            registry=r,
        )
        self.latency = Histogram(
            "fuseserve_teacher_request_seconds",
            "Score request latency",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.failures = Counter(
            "fuseserve_teacher_failures", "failed requests by kind", ["kind"], registry=r
        )
