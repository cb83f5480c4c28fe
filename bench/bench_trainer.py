"""Benchmark: fused training step time vs CLM-only, and peak memory of sparse vs dense targets.

1. Step time. A small Llama (Mistral v1 vocabulary, d = 128, 4 layers) trains with Ray Train (one
   CPU worker) on the same packed blocks for the same steps: CLM only, and fused (λ = 0.9) with
   targets streamed from a live aligner (two tiny teacher processes, SentencePiece and byte-level
   BPE). The fused run goes twice; the second is measured with the aligner's cache warm. Mean
   ``step_s`` (batch fetch, forward, loss, backward, optimizer) over the steps after warm-up.
   Target: CLM-only step time / fused step time >= 0.9.
2. Peak memory of the loss at vocab 32,000: the sparse loss (gathers at W fused ids) vs a dense
   target tensor [B, L, V], each in a fresh process (peak RSS growth over the inputs).

Usage: python bench/bench_trainer.py [--steps 30] [--block-size 512] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path


def peak_memory(kind: str, batch: int, length: int, vocab: int, width: int, queue) -> None:
    import torch

    from fuseserve.trainer.loss import clm_loss, combined_loss, dense_fusion_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, length, vocab, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    ids = torch.randint(0, vocab, (batch, length, width), generator=g)
    probs = torch.softmax(torch.randn(batch, length, width, generator=g), -1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "sparse":
        loss, _, _ = combined_loss(logits, labels, ids, probs, lam=0.9)
    else:
        dense = torch.zeros(batch, length, vocab)
        dense.scatter_add_(-1, ids, probs)
        loss = 0.9 * clm_loss(logits, labels) + 0.1 * dense_fusion_loss(logits, dense)
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((after - before) * 1024)


def measure_memory(batch: int, length: int, vocab: int, width: int) -> dict[str, int]:
    ctx = mp.get_context("spawn")
    out = {}
    for kind in ("sparse", "dense"):
        queue = ctx.Queue()
        proc = ctx.Process(target=peak_memory, args=(kind, batch, length, vocab, width, queue))
        proc.start()
        out[kind] = queue.get(timeout=600)
        proc.join()
    return out


def mean_step(path: Path, skip: int) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return statistics.mean(r["step_s"] for r in rows[skip:])


def step_times(args, work: Path) -> dict[str, float]:
    import ray

    from fuseserve import launch, shipped
    from fuseserve.aligner.service.app import start_aligner
    from fuseserve.aligner.service.settings import load_settings, parse_teacher_flag
    from fuseserve.teacher.tiny import save_tiny_llama
    from fuseserve.trainer.config import load_config
    from fuseserve.trainer.job import run_training

    spm = shipped.mistral_v1_tokenizer()
    target = save_tiny_llama(spm, work / "target", seed=0, hidden=128, layers=4, heads=4)
    teachers = {
        "spm": save_tiny_llama(spm, work / "t-spm", seed=1),
        "bpe": save_tiny_llama(shipped.smollm2_tokenizer(), work / "t-bpe", seed=2),
    }
    import pydoc_data.topics

    corpus = work / "corpus.txt"
    topics = pydoc_data.topics.topics
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    procs = {
        n: launch.start_teacher(n, str(d), work / "logs", extra=["--max-sequence-length", "4096"])
        for n, d in teachers.items()
    }
    loop = asyncio.new_event_loop()
    import threading

    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(600)

    running = None
    try:
        for p in procs.values():
            launch.wait_grpc_serving(p, 300)
        settings = load_settings(
            teachers=[parse_teacher_flag(f"{n}=127.0.0.1:{p.port}") for n, p in procs.items()],
            rest_port=0,
            grpc_port=0,
            vocab_map_dir=str(work / "maps"),
            info_refresh_s=0,
            log_level="warning",
        )

        async def start():
            r = await start_aligner(settings)
            await r.wait_ready(600)
            return r

        running = run(start())
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        common = dict(
            model=str(target),
            data=[str(corpus)],
            block_size=args.block_size,
            batch_size=args.batch_size,
            max_steps=args.steps,
            num_workers=1,
            lr=1e-4,
            storage_path=str(work / "runs"),
            checkpoint_every=args.steps,
            log_every=args.steps,
            prefetch_depth=8,
        )
        aligner = f"127.0.0.1:{running.grpc_port}"
        out = {}
        for label, extra in (
            ("fused (cold cache)", {"aligner": aligner, "lam": 0.9}),
            ("fused (warm cache)", {"aligner": aligner, "lam": 0.9}),
            ("clm only", {"lam": 1.0}),
        ):
            name = label.replace(" ", "_").replace("(", "").replace(")", "")
            metrics = work / f"{name}.jsonl"
            run_training(load_config(**common, **extra, name=name, metrics_file=str(metrics)))
            out[label] = mean_step(metrics, skip=3)
            print(f"  {label}: {out[label] * 1000:.0f} ms/step", flush=True)
        return out
    finally:
        if running is not None:
            run(running.stop(1.0))
        for p in procs.values():
            p.stop()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--memory-length", type=int, default=2048)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    shape = f"block {args.block_size} x batch {args.batch_size}, {args.steps} steps"
    print(f"{platform.machine()}, {shape}")
    times = step_times(args, work)
    ratio = times["clm only"] / times["fused (warm cache)"]
    mem = measure_memory(2, args.memory_length, 32000, 20)
    print("\n| run | ms/step |\n|---|---|")
    for label, t in times.items():
        print(f"| {label} | {t * 1000:.0f} |")
    print(f"\nCLM-only / fused (warm) step time: {ratio:.2f} (target >= 0.9)")
    print(
        f"loss peak memory, B=2 L={args.memory_length} V=32000 W=20: sparse "
        f"{mem['sparse'] / 2**20:.0f} MiB, dense target {mem['dense'] / 2**20:.0f} MiB "
        f"({mem['dense'] / max(mem['sparse'], 1):.1f}x)"
    )
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
