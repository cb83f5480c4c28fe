"""Benchmark: fused training step time vs CLM-only (with gradient accumulation), and peak memory
of the loss at V = 32k and 128k: fused (sparse, in sequence chunks) vs CLM-only vs dense targets.

1. Step time. A small Llama (Mistral v1 vocabulary, d = 128, 4 layers) trains with Ray Train (one
   CPU worker) on the same packed blocks for the same steps, ``--grad-accum`` micro-batches per
   step: CLM only, and fused (λ = 0.9) with targets streamed from a live aligner (two tiny
   teacher processes, SentencePiece and byte-level BPE). The fused run goes twice; the second is
   measured with the aligner's cache warm. Mean ``step_s`` (batch fetch, forward, loss, backward,
   optimizer) over the steps after warm-up. Target: CLM-only step time / fused >= 0.95. The
   defaults train on 2,048 tokens per step (2 micro-batches of 2 x 512), as issue #5 measured.
2. Peak memory of the loss and its backward on synthetic logits [1, L, V] (V = 32,000 and
   128,256), each in a fresh process (peak RSS growth over the inputs, which hold the logits):
   ``clm`` = the plain cross-entropy a CLM-only run uses (``F.cross_entropy``), ``fused`` = λ·CLM +
   (1−λ)·fusion with W fused ids per position in chunks of ``--loss-chunk`` positions,
   ``fused, one chunk`` = the same without chunks, ``dense`` = a dense [1, L, V] target.
   The gradient of the logits ([L, V] float32) is part of every figure.

Usage: python bench/bench_trainer.py [--steps 20] [--block-size 512] [--batch-size 2]
       [--grad-accum 2] [--memory-length 2048] [--loss-chunk 1024] [--skip-steps | --skip-memory]
       [--target tiny|smollm2] [--use-gpu] [--parallel ddp|fsdp] [--mixed-precision no|bf16]
On a GPU the step-time rows also give the worker's peak GPU memory (``peak_memory_mib``).
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


def loss_inputs(length: int, vocab: int, width: int, device="cpu", dtype=None):
    """Synthetic (logits [1, L, V] with grad, labels, fused ids [1, L, W], fused probs)."""
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, length, vocab, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, length), generator=g).to(device)
    ids = torch.randint(0, vocab, (1, length, width), generator=g).to(device)
    probs = torch.softmax(torch.randn(1, length, width, generator=g), -1).to(device)
    return logits, labels, ids, probs


def loss_of(kind: str, logits, labels, ids, probs, chunk: int):
    """The loss a ``kind`` of ``MEMORY_KINDS`` computes (λ = 0.9 for the fused ones)."""
    import torch

    from fuseserve.trainer.loss import clm_loss, combined_loss, dense_fusion_loss

    if kind == "clm":
        return clm_loss(logits, labels)
    if kind == "fused":
        return combined_loss(logits, labels, ids, probs, lam=0.9, chunk=chunk)[0]
    if kind == "fused, one chunk":
        return combined_loss(logits, labels, ids, probs, lam=0.9)[0]
    dense = torch.zeros(logits.shape, device=logits.device)
    dense.scatter_add_(-1, ids, probs)
    return 0.9 * clm_loss(logits, labels) + 0.1 * dense_fusion_loss(logits, dense)


def peak_memory(kind: str, length: int, vocab: int, width: int, chunk: int, queue) -> None:
    logits, labels, ids, probs = loss_inputs(length, vocab, width)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss_of(kind, logits, labels, ids, probs, chunk).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((after - before) * 1024)


MEMORY_KINDS = ("clm", "fused", "fused, one chunk", "dense")


def measure_memory(length: int, vocab: int, width: int, chunk: int) -> dict[str, int]:
    ctx = mp.get_context("spawn")
    out = {}
    for kind in MEMORY_KINDS:
        queue = ctx.Queue()
        proc = ctx.Process(target=peak_memory, args=(kind, length, vocab, width, chunk, queue))
        proc.start()
        out[kind] = queue.get(timeout=900)
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
    if args.target == "smollm2":  # SmolLM2-135M from the shipped GGUF, as a HF directory
        from fuseserve.teacher.hf_backend import HFBackend

        backend = HFBackend.load("shipped:smollm2", device="cpu", dtype="float32")
        target = work / "target"
        backend.model.save_pretrained(target)
        backend.tokenizer.save_pretrained(target)
    else:
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
            grad_accum=args.grad_accum,
            max_steps=args.steps,
            num_workers=1,
            lr=1e-4,
            storage_path=str(work / "runs"),
            checkpoint_every=args.steps,
            log_every=args.steps,
            loss_chunk=args.loss_chunk,
            use_gpu=args.use_gpu,
            parallel=args.parallel,
            mixed_precision=args.mixed_precision,
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
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            peak = max((r.get("peak_memory_mib", 0.0) for r in rows), default=0.0)
            wait = statistics.mean(r["wait_fraction"] for r in rows[3:])
            note = f", waiting for targets {wait:.0%}"
            note += f", peak GPU memory {peak:,.0f} MiB" if peak else ""
            print(f"  {label}: {out[label] * 1000:.0f} ms/step{note}", flush=True)
        return out
    finally:
        if running is not None:
            run(running.stop(1.0))
        for p in procs.values():
            p.stop()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per block")
    parser.add_argument("--batch-size", type=int, default=2, help="blocks per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--memory-length", type=int, default=2048, help="L of the memory test")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="positions per loss chunk")
    parser.add_argument("--skip-steps", action="store_true", help="only the memory test")
    parser.add_argument("--skip-memory", action="store_true", help="only the step times")
    parser.add_argument(
        "--target", choices=("tiny", "smollm2"), default="tiny", help="the model trained"
    )
    parser.add_argument("--use-gpu", action="store_true", help="train on one GPU")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    args = parser.parse_args()
    for flag in ("steps", "block_size", "batch_size", "grad_accum", "memory_length", "loss_chunk"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    ok = True
    if not args.skip_steps:
        shape = (
            f"block {args.block_size} x batch {args.batch_size} x grad-accum {args.grad_accum}, "
            f"{args.steps} steps"
        )
        print(f"{platform.machine()}, {shape}")
        times = step_times(args, work)
        ratio = times["clm only"] / times["fused (warm cache)"]
        print("\n| run | ms/step |\n|---|---|")
        for label, t in times.items():
            print(f"| {label} | {t * 1000:.0f} |")
        print(f"\nCLM-only / fused (warm) step time: {ratio:.3f} (target >= 0.95)")
        ok = ratio >= 0.95
    if args.skip_memory:
        return 0 if ok else 1
    print(
        f"\npeak loss memory (MiB), L = {args.memory_length}, W = 20, "
        f"chunk = {args.loss_chunk} positions"
    )
    print("| V | " + " | ".join(MEMORY_KINDS) + " | fused / clm |")
    print("|---" * (len(MEMORY_KINDS) + 2) + "|")
    for vocab in (32000, 128256):
        mem = measure_memory(args.memory_length, vocab, 20, args.loss_chunk)
        cells = " | ".join(f"{mem[k] / 2**20:,.0f}" for k in MEMORY_KINDS)
        print(f"| {vocab:,} | {cells} | {mem['fused'] / max(mem['clm'], 1):.2f} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
