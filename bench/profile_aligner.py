"""Profile: where the aligner's per-block time goes with the ``spans`` preset (issue #22).

Setup as ``bench_aligner.py``: three tiny-Llama teacher processes (Mistral v1, SmolLM2, MiniLM
tokenizers), the aligner in this process (target Mistral v1, in-process LRU cache), 2048-token
blocks of the Python docs. Every block is fused once with ``spans`` (the teachers' scores and the
continuation tables are then cached); before each measured request its fused block is dropped
from the cache (``spans`` allows no other temperature), so the fused block misses and the scores
hit: what is left is the aligner's own work per block.

Measured in-process, not by wall clock: CPU seconds of this process per block
(``time.process_time``), and two cProfile profiles: the event loop's thread (validation, cache
look-ups, decoding the cached scores, keys, encoding the fused block for the cache) and the
worker thread that runs ``pipeline.fuse_block`` (alignment and fusion), each profiled where it
runs.

Usage: python bench/profile_aligner.py [--blocks 6] [--rounds 3] [--top 25] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_aligner import BLOCK, make_blocks, start_tiny_teachers, three_tokenizers

from fuseserve.aligner.service import dataplane
from fuseserve.aligner.service.app import start_aligner
from fuseserve.aligner.service.cache import LRUCache
from fuseserve.aligner.service.settings import load_settings


class ThreadProfile:
    """Wraps ``dataplane.fuse_block`` so that each call is profiled in the thread it runs in."""

    def __init__(self) -> None:
        self.stats: pstats.Stats | None = None
        self.lock = threading.Lock()
        self.inner = dataplane.fuse_block
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args, **kwargs):
        profile = cProfile.Profile()
        start = time.thread_time()
        profile.enable()
        try:
            return self.inner(*args, **kwargs)
        finally:
            profile.disable()
            with self.lock:
                self.seconds += time.thread_time() - start
                self.calls += 1
                if self.stats is None:
                    self.stats = pstats.Stats(profile)
                else:
                    self.stats.add(profile)


def forget(cache: LRUCache, key: str) -> None:
    """Drop one entry of the in-process cache (it has no delete of its own)."""
    value = cache._data.pop(key, None)
    cache.bytes -= len(value or b"")


def report(stats: pstats.Stats | None, title: str, top: int) -> str:
    if stats is None:
        return f"{title}: nothing recorded\n"
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return f"===== {title}\n{out.getvalue()}"


async def cpu_per_block(service, blocks: list[str], rounds: int) -> float:
    """CPU milliseconds of this process per block, every block's fused entry dropped first."""
    cpu = time.process_time()
    for _ in range(rounds):
        for text in blocks:
            query = service.query([text], preset="spans")
            forget(service.cache, service._fused_key(query, text))
            await service.fuse(query)
    return 1000 * (time.process_time() - cpu) / (rounds * len(blocks))


async def measure(service, blocks: list[str], rounds: int, top: int) -> str:
    await service.fuse(service.query(blocks, preset="spans"))  # scores and tables cached
    plain_ms = await cpu_per_block(service, blocks, rounds)
    worker = ThreadProfile()
    dataplane.fuse_block = worker  # type: ignore[assignment]
    loop_profile = cProfile.Profile()
    cpu = time.process_time()
    try:
        for _ in range(rounds):
            for text in blocks:
                query = service.query([text], preset="spans")
                forget(service.cache, service._fused_key(query, text))
                loop_profile.enable()
                await service.fuse(query)
                loop_profile.disable()
    finally:
        dataplane.fuse_block = worker.inner
    n = rounds * len(blocks)
    cpu_ms = 1000 * (time.process_time() - cpu) / n
    worker_ms = 1000 * worker.seconds / max(1, worker.calls)
    head = (
        f"{n} blocks of {BLOCK} target tokens, 3 teachers, spans, scores cached: "
        f"{plain_ms:.1f} ms CPU per block in this process without a profiler; with the "
        f"profilers on {cpu_ms:.1f} ms, of which fuse_block {worker_ms:.1f} ms (its thread's "
        "CPU time)\n"
    )
    return (
        head
        + report(pstats.Stats(loop_profile), "event loop thread (profiler on)", top)
        + report(worker.stats, "fuse_block's worker thread (profiler on)", top)
    )


async def run(teachers, vocab_dir: str, blocks: list[str], args) -> str:
    settings = load_settings(
        teachers=teachers, rest_port=0, grpc_port=0, vocab_map_dir=vocab_dir, preset="spans",
        info_refresh_s=0, log_level="warning",
    )  # fmt: skip
    running = await start_aligner(settings)
    await running.wait_ready(600)
    try:
        return await measure(running.service, blocks, args.rounds, args.top)
    finally:
        await running.stop(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="profile-aligner-"))
    toks = three_tokenizers()
    blocks = make_blocks(toks["spm"], args.blocks)
    procs = {}
    try:
        teachers = start_tiny_teachers(work, toks, procs)
        text = asyncio.run(run(teachers, str(work / "maps"), blocks, args))
    finally:
        for proc in procs.values():
            proc.stop()
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
