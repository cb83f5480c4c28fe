"""The event-loop lag metric: a loop blocked for 0.3 s is observed as about 0.3 s late."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from fuseserve.aligner.service.metrics import AlignerMetrics, sample_loop_lag


def observed(metrics: AlignerMetrics) -> tuple[float, float]:
    """(count, sum) of the lag histogram."""
    name = "fuseserve_aligner_event_loop_lag_seconds"
    count = metrics.registry.get_sample_value(f"{name}_count")
    total = metrics.registry.get_sample_value(f"{name}_sum")
    return count or 0.0, total or 0.0


def test_a_blocked_loop_is_observed_late():
    metrics = AlignerMetrics(CollectorRegistry())

    async def scenario() -> tuple[tuple[float, float], tuple[float, float]]:
        sampler = asyncio.create_task(sample_loop_lag(metrics.loop_lag, interval_s=0.01))
        await asyncio.sleep(0.05)
        free = observed(metrics)
        time.sleep(0.3)  # blocking work on the loop: every request would wait this long
        await asyncio.sleep(0.05)
        sampler.cancel()
        return free, observed(metrics)

    (free_count, free_sum), (count, total) = asyncio.run(scenario())
    assert free_count >= 1
    assert total - free_sum >= 0.25  # the blocked sleep was observed ~0.29 s late
    assert count > free_count
