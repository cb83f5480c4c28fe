"""Benchmark: the aligner under faults and overload (issue #15), as an operator would probe it.

Setup: redis-server, two ``fuseserve teacher`` processes (tiny Llama models, fixed seed, on the
Mistral v1 and SmolLM2 tokenizers) and the aligner as a process with Redis, every text distinct
so nothing is a cache hit unless said so. Scenarios, in one run:

1. capacity: closed loop (4 at a time) for ``--seconds``: requests/s answered 200;
2. overload: open loop at ``--overload`` x capacity for 30 s: answers by status, p99 latency of
   the refusals, goodput (200s per second during the load / capacity), recovery (requests one at
   a time from the end of the load: when the first is answered, and when one is answered within
   twice the capacity run's median), the aligner's RSS before and after, each process's CPU
   share, the load generator's and the aligner's event-loop lag (where a refusal's time goes);
3. teacher SIGKILL under 150 concurrent requests: how many hung (no answer in 60 s), how long
   until ``/v1/teachers`` shows it not ready, then success rate after a restart;
4. Redis SIGKILL / restart / SIGSTOP: added p99 on misses, hits right after a restart, and whether
   150 concurrent requests ever print "serving uncached";
5. ``/healthz`` p99 while maximal (7.8 MB) texts are being rejected.

On a machine this small the teachers' forward passes take most of the CPU the aligner would have
on its own hardware; ``--teacher-nice 10 --teacher-threads 1`` runs them at a lower priority with
one torch thread each, standing in for teachers on their own cores (docs/benchmarks.md reports
runs with and without).

Usage: python bench/bench_faults.py [--seconds 10] [--overload 5] [--deadline 5]
       [--teacher-nice 0] [--teacher-threads 0]
Prints a markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from rawhttp import RawPool

from fuseserve import launch, shipped
from fuseserve.teacher.tiny import save_tiny_llama

TEACHER_ARGS = ["--max-sequence-length", "1024", "--max-k", "32", "--batch-wait-ms", "2"]
counter = itertools.count()


def text() -> str:
    """A distinct ~60-token text (never a cache hit)."""
    n = next(counter)
    return f"Request {n}: the quick brown fox {n % 97} jumps over the lazy dog " * 4


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def counts(by: dict[int, int]) -> str:
    return ", ".join(f"{k or 'no answer'}: {v}" for k, v in sorted(by.items()))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def loop_lag(stop: asyncio.Event, lags: list[float], tick: float = 0.01) -> None:
    """How late this process's event loop wakes from a ``tick`` sleep, until ``stop`` is set: a
    refusal measured here waits at least this long in the load generator itself."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(tick)
        lags.append(time.perf_counter() - start - tick)


LAG = "fuseserve_aligner_event_loop_lag_seconds"


async def aligner_lag(client: httpx.AsyncClient) -> dict[float, float]:
    """The aligner's event-loop lag histogram now: {bucket upper bound s: samples at or below}."""
    text = (await client.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith(f"{LAG}_bucket{{"):
            le = line.split('le="')[1].split('"')[0]
            out[float(le)] = float(line.split()[-1])
    return out


def lag_quantile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """The bucket bound under which a share ``q`` of the samples between two scrapes fell."""
    delta = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    for le, count in delta.items():
        if total and count >= q * total:
            return f"<= {le * 1e3:g} ms" if le != float("inf") else "> 2.5 s"
    return "no samples"


async def post(raw: RawPool, body, timeout=60.0) -> tuple[int, float, float]:
    """(status or 0 for no answer, latency s, finish time) of one POST /v1/fuse."""
    start = time.perf_counter()
    try:
        status, _ = await raw.post("/v1/fuse", body, timeout=timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        status = 0
    end = time.perf_counter()
    return status, end - start, end


async def capacity(raw: RawPool, seconds: float) -> tuple[float, list[float]]:
    stop = time.perf_counter() + seconds
    latencies: list[float] = []

    async def worker():
        while time.perf_counter() < stop:
            status, lat, _ = await post(raw, {"text": text()})
            if status == 200:
                latencies.append(lat)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(4)))
    return len(latencies) / (time.perf_counter() - start), latencies


async def overload(raw: RawPool, rate: float, seconds: float, normal_s: float):
    """An open loop at ``rate`` for ``seconds``, and from its end the recovery probe."""
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(post(raw, {"text": text()})))
    end = time.perf_counter()
    probe = asyncio.ensure_future(recovery(raw, end, normal_s))
    results = await asyncio.gather(*tasks)
    return results, start, end, await probe


async def recovery(raw: RawPool, load_end: float, normal_s: float) -> tuple[float, float]:
    """Requests one at a time from the end of an overload: (seconds until the first 200 was
    answered, seconds until a 200 took at most ``normal_s``: normal latency is back)."""
    first = None
    while time.perf_counter() - load_end < 60:
        status, latency, end = await post(raw, {"text": text()})
        if status != 200:
            await asyncio.sleep(0.05)
            continue
        first = end - load_end if first is None else first
        if latency <= normal_s:
            return first, end - load_end
    return first if first is not None else float("nan"), float("nan")


async def misses(raw: RawPool, n: int = 40) -> tuple[float, float]:
    """p50 and p99 latency of ``n`` misses sent one at a time (less noise than concurrent)."""
    lat = []
    for _ in range(n):
        status, seconds, _ = await post(raw, {"text": text()})
        if status == 200:
            lat.append(seconds)
    return p(lat, 0.5), p(lat, 0.99)


def start_teacher(args, name: str, model_dir: Path, logs: Path, port: int | None = None):
    """A teacher process, at ``--teacher-nice`` (set before torch starts its threads, which
    inherit it) with ``--teacher-threads`` torch threads (0: torch's default)."""
    if args.teacher_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.teacher_threads)
    try:
        proc = launch.start_teacher(name, str(model_dir), logs, port=port, extra=TEACHER_ARGS)
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
    if args.teacher_nice:
        os.setpriority(os.PRIO_PROCESS, proc.popen.pid, args.teacher_nice)
    return proc


async def main_async(args, work: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    logs = work / "logs"
    logs.mkdir()
    dirs = {
        "spm": save_tiny_llama(shipped.mistral_v1_tokenizer(), work / "spm", seed=1),
        "bpe": save_tiny_llama(shipped.smollm2_tokenizer(), work / "bpe", seed=2),
    }
    redis = launch.start_redis(logs)
    teachers = {n: start_teacher(args, n, d, logs) for n, d in dirs.items()}
    for t in teachers.values():
        launch.wait_grpc_serving(t, 300)
    aligner = launch.start_aligner(
        {n: [f"127.0.0.1:{t.port}"] for n, t in teachers.items()},
        logs,
        extra=[
            "--vocab-map-dir", str(work / "maps"),
            "--preset", "default",
            "--interactive-deadline-s", str(args.deadline),
            "--redis-retry-s", "1",
        ],
        env={"REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"},
    )  # fmt: skip
    try:
        launch.wait_grpc_serving(aligner, 300)
        # POSTs through a minimal keep-alive client (rawhttp): httpx's own CPU per request would
        # make the load generator, on the same cores, the bottleneck of the overload test
        raw = RawPool("127.0.0.1", aligner.rest_port)
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{aligner.rest_port}", limits=limits
        ) as client:
            await capacity(raw, 2)  # warm-up
            cap, cap_lat = await capacity(raw, args.seconds)
            base = statistics.median(cap_lat)
            ms = 1e3
            rows.append(
                ("capacity (closed loop, 4 at a time)", f"{cap:.1f} req/s, p50 {base * ms:.0f} ms")
            )

            # ---- overload
            rss0 = rss_mib(aligner.popen.pid)
            rate = args.overload * cap
            normal = 2 * base  # "normal latency": within twice the capacity run's median
            pids = {"aligner": aligner.popen.pid, "load generator": os.getpid()}
            pids.update({f"teacher {n}": t.popen.pid for n, t in teachers.items()})
            cpu0 = {n: cpu_s(pid) for n, pid in pids.items()}
            lag0 = await aligner_lag(client)
            lags: list[float] = []
            stop_lag = asyncio.Event()
            lag_task = asyncio.ensure_future(loop_lag(stop_lag, lags))
            results, t0, t1, (first, back) = await overload(raw, rate, 30, normal)
            stop_lag.set()
            await lag_task
            lag1 = await aligner_lag(client)
            wall = time.perf_counter() - t0
            used = {n: (cpu_s(pid) - cpu0[n]) / wall for n, pid in pids.items()}
            shares = ", ".join(f"{n} {share:.0%}" for n, share in used.items())
            by = {}
            for status, _, _ in results:
                by[status] = by.get(status, 0) + 1
            refused = [lat for s, lat, _ in results if s in (429, 503)]
            good = sum(1 for s, _, end in results if s == 200 and end <= t1 + args.deadline)
            goodput = good / (t1 - t0)
            rss1 = rss_mib(aligner.popen.pid)
            load = f"overload {args.overload:g}x ({rate:.1f} req/s for 30 s): answers"
            rows += [
                (load, counts(by)),
                (
                    "overload: refusals (429/503) latency p50 / p99",
                    f"{p(refused, 0.5) * ms:.0f} / {p(refused, 0.99) * ms:.0f} ms",
                ),
                (
                    "overload: goodput / capacity",
                    f"{goodput:.1f} / {cap:.1f} req/s = {goodput / cap:.0%}",
                ),
                (
                    "recovery: first 200 / normal latency (<= 2x capacity p50) after the load",
                    f"{first:.1f} / {back:.1f} s",
                ),
                ("aligner RSS before / after the overload", f"{rss0:.0f} / {rss1:.0f} MiB"),
                (
                    "overload: where the CPU went (share of one core, load and recovery)",
                    shares,
                ),
                (
                    "overload: load generator's event-loop lag p50 / p99 / max",
                    f"{p(lags, 0.5) * ms:.0f} / {p(lags, 0.99) * ms:.0f} / "
                    f"{max(lags, default=float('nan')) * ms:.0f} ms",
                ),
                (
                    "overload: the aligner's event-loop lag p50 / p99 (metric buckets)",
                    f"{lag_quantile(lag0, lag1, 0.5)} / {lag_quantile(lag0, lag1, 0.99)}",
                ),
            ]

            # ---- teacher SIGKILL under 150 concurrent requests
            bpe = teachers["bpe"]
            storm = [asyncio.ensure_future(post(raw, {"text": text()})) for _ in range(150)]
            await asyncio.sleep(0.5)
            bpe.kill()
            killed = time.perf_counter()
            seen = None
            while time.perf_counter() - killed < 30:
                r = await client.get("/v1/teachers")
                if not next(t for t in r.json() if t["name"] == "bpe")["ready"]:
                    seen = time.perf_counter() - killed
                    break
                await asyncio.sleep(0.05)
            results = await asyncio.gather(*storm)
            hung = sum(1 for s, _, _ in results if s == 0)
            slowest = max(lat for _, lat, _ in results)
            codes = {}
            for s, _, _ in results:
                codes[s] = codes.get(s, 0) + 1
            teachers["bpe"] = start_teacher(args, "bpe", dirs["bpe"], logs, port=bpe.port)
            launch.wait_grpc_serving(teachers["bpe"], 300)
            while True:
                r = await client.get("/readyz")
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            after = []
            for _ in range(50):  # 2 at a time: within capacity
                after += await asyncio.gather(*(post(raw, {"text": text()}) for _ in range(2)))
            ok = sum(1 for s, _, _ in after if s == 200)
            after_codes: dict[int, int] = {}
            for s, _, _ in after:
                after_codes[s] = after_codes.get(s, 0) + 1
            shown = f"{seen:.2f} s" if seen is not None else "not within 30 s"
            rows += [
                (
                    "teacher SIGKILL, 150 concurrent: answers",
                    f"{counts(codes)}; hung {hung}; slowest {slowest:.1f} s",
                ),
                ("teacher SIGKILL: shown not ready after", shown),
                ("after restart: 100 requests (2 at a time)", f"{ok}% OK ({counts(after_codes)})"),
            ]

            # ---- Redis
            up = await misses(raw)
            redis.kill()
            dead = await misses(raw)  # the first one turns the cache off
            redis = launch.start_redis(logs, port=redis.port)
            await asyncio.sleep(1.2)  # past redis_retry_s
            texts = [text() for _ in range(40)]
            for i in range(0, 40, 4):
                await asyncio.gather(*(post(raw, {"text": t}) for t in texts[i : i + 4]))
            hits = 0
            for t in texts:
                try:
                    r = await client.post("/v1/fuse", json={"text": t}, timeout=60)
                except httpx.HTTPError:
                    continue
                hits += r.status_code == 200 and r.json()["blocks"][0]["cache_hit"]
            redis.popen.send_signal(signal.SIGSTOP)
            try:
                stopped = await misses(raw)
            finally:
                redis.popen.send_signal(signal.SIGCONT)
            await asyncio.sleep(1.2)
            before = aligner.log_path.read_text(errors="replace").count("serving uncached")
            await asyncio.gather(*(post(raw, {"text": text()}) for _ in range(150)))
            during = aligner.log_path.read_text(errors="replace").count("serving uncached") - before
            rows += [
                (
                    "misses p50 / p99, one at a time: Redis up | SIGKILLed | SIGSTOPped",
                    " | ".join(f"{a * ms:.0f} / {b * ms:.0f} ms" for a, b in (up, dead, stopped)),
                ),
                (
                    "added p99 on misses: SIGKILLed / SIGSTOPped",
                    f"{(dead[1] - up[1]) * ms:+.0f} / {(stopped[1] - up[1]) * ms:+.0f} ms",
                ),
                ("Redis restarted: hits on 40 texts written just after", f"{hits}/40"),
            ]
            rows.append(
                ("'serving uncached' during 150 concurrent requests, Redis up", str(during))
            )

            # ---- /healthz while maximal texts are rejected
            huge = {"text": "word " * (7_800_000 // 5)}
            health: list[float] = []
            done = asyncio.Event()

            async def poll():
                while not done.is_set():
                    start = time.perf_counter()
                    await client.get("/healthz")
                    health.append(time.perf_counter() - start)
                    await asyncio.sleep(0.01)

            poller = asyncio.ensure_future(poll())
            codes = [(await post(raw, huge))[0] for _ in range(5)]
            done.set()
            await poller
            rows.append(
                (
                    "/healthz p99 while 5 maximal (7.8 MB) texts are rejected",
                    f"{p(health, 0.99) * ms:.0f} ms ({len(health)} probes; "
                    f"answers {sorted(set(codes))})",
                )
            )
    finally:
        aligner.stop()
        for t in teachers.values():
            t.stop()
        redis.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--overload", type=float, default=5.0)
    parser.add_argument(
        "--deadline", type=float, default=5.0, help="interactive_deadline_s (5: the default)"
    )
    parser.add_argument(
        "--teacher-nice", type=int, default=0, help="teachers' nice value (0: same as the aligner)"
    )
    parser.add_argument(
        "--teacher-threads", type=int, default=0, help="torch threads per teacher (0: default)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        rows = asyncio.run(main_async(args, Path(tmp)))
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, interactive_deadline_s={args.deadline:g}, "
        f"teachers at nice {args.teacher_nice} with "
        f"{args.teacher_threads or 'the default number of'} torch threads\n"
    )
    print("| scenario | measured |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
