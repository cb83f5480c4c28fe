"""Dynamic batching: concurrent Score requests share forward passes.

Covers a bounded queue of tokenised sequences (full -> ``Overloaded`` at once; sequences whose
caller has gone, cancelled or past its deadline, are dropped before any compute), a collector that
waits up to ``wait_s`` for company and packs sequences while the padded batch stays within the
token budget, and one worker thread that runs the backend. Sequences asking for different k share
a batch: it is scored at the largest k and each reply keeps its first k columns (top-k is sorted).

Leaves out: validation (``server``) and the model (the backend).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from fuseserve.teacher.backend import TokenizedText
from fuseserve.teacher.errors import EngineUnavailable, InvalidRequest, Overloaded
from fuseserve.teacher.metrics import TeacherMetrics
from fuseserve.wire.messages import TeacherScores

log = logging.getLogger(__name__)

ScoreFn = Callable[[list[TokenizedText], int], list[TeacherScores]]


@dataclass
class _Job:
    item: TokenizedText
    k: int
    future: asyncio.Future


class DynamicBatcher:
    def __init__(
        self,
        score: ScoreFn,
        token_budget: int,
        wait_s: float,
        max_queue: int,
        metrics: TeacherMetrics,
        on_health: Callable[[bool], object] = lambda ok: None,
    ) -> None:
        self._score = score
        self._budget = token_budget
        self._wait_s = wait_s
        self._max_queue = max_queue
        self._metrics = metrics
        self._on_health = on_health
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self._task: asyncio.Task | None = None
        self._closed = False
        self.in_flight = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, items: list[TokenizedText], k: int) -> list[TeacherScores]:
        if self._closed:
            raise EngineUnavailable("teacher is shutting down")
        if len(self._queue) + len(items) > self._max_queue:
            self._drop_gone()
        if len(self._queue) + len(items) > self._max_queue:
            raise Overloaded(
                f"queue full ({len(self._queue)} sequences waiting, limit {self._max_queue})"
            )
        loop = asyncio.get_running_loop()
        jobs = [_Job(item, k, loop.create_future()) for item in items]
        self._queue.extend(jobs)
        self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        self.in_flight += 1
        try:
            return list(await asyncio.gather(*(j.future for j in jobs)))
        finally:
            self.in_flight -= 1

    def _drop_gone(self) -> None:
        """Forget queued sequences whose caller has gone (cancelled, deadline passed): they are
        never computed."""
        kept = deque(j for j in self._queue if not j.future.done())
        dropped = len(self._queue) - len(kept)
        if dropped:
            self._queue = kept
            self._metrics.dropped.inc(dropped)

    def _take_batch(self) -> list[_Job]:
        self._drop_gone()
        batch: list[_Job] = []
        longest = 0
        while self._queue:
            nxt = self._queue[0]
            longest_if = max(longest, len(nxt.item.ids))
            if batch and longest_if * (len(batch) + 1) > self._budget:
                break
            batch.append(self._queue.popleft())
            longest = longest_if
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not (self._closed and not self._queue):
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._wait_s > 0:
                await asyncio.sleep(self._wait_s)
            batch = self._take_batch()
            self._metrics.queue_depth.set(len(self._queue))
            if not batch:
                continue
            k = max(j.k for j in batch)
            try:
                results = await loop.run_in_executor(
                    self._executor, self._score, [j.item for j in batch], k
                )
            except InvalidRequest as exc:
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            except Exception as exc:  # the engine failed: report unhealthy, fail this batch
                log.exception("scoring failed")
                self._on_health(False)
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(EngineUnavailable(f"engine failed: {exc}"))
                continue
            self._on_health(True)
            self._metrics.batch_size.observe(len(batch))
            self._metrics.tokens.inc(sum(len(j.item.ids) for j in batch))
            for job, result in zip(batch, results):
                if job.k < k:
                    result = replace(
                        result,
                        topk_ids=result.topk_ids[:, : job.k],
                        topk_logprobs=result.topk_logprobs[:, : job.k],
                    )
                if not job.future.done():
                    job.future.set_result(result)

    async def close(self) -> None:
        """Stop accepting; finish what is queued."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
