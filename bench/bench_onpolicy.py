"""Benchmark: on-policy step time vs off-policy step time at the same batch, in the same run.

One ``fuseserve train`` job (Ray Train, one worker) with ``--on-policy 0.5``: steps alternate
between off-policy (blocks of ``--block-size`` tokens, fused targets prefetched from a live
aligner, λ = 0.5) and on-policy (prompts of ``block-size − max-new-tokens`` tokens cut from the
same kind of blocks, ``--max-new-tokens`` sampled with the KV cache, the samples fused by the
aligner as ids, the sampled-token reverse KL), so both kinds of step train on the same number of
sequences of at most the same length, and the teachers score as many tokens. The aligner asks
two tiny teacher processes (SentencePiece and byte-level BPE); the target is a small Llama on
the Mistral v1 vocabulary (d = 128, 4 layers). Mean ``step_s`` of each kind after its first two
steps; the ratio on-policy / off-policy (goal <= 1.5), with the generation share of on-policy
steps and the share spent waiting for the aligner.

Usage: python bench/bench_onpolicy.py [--steps 20] [--block-size 256] [--max-new-tokens 128]
       [--batch-size 2] [--grad-accum 2] [--use-gpu] [--target tiny|smollm2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path


def build_models(args, work: Path) -> tuple[Path, dict[str, Path], Path]:
    """(target dir, teacher dirs, corpus file)."""
    import pydoc_data.topics

    from fuseserve import shipped
    from fuseserve.teacher.tiny import save_tiny_llama

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
    corpus = work / "corpus.txt"
    topics = pydoc_data.topics.topics
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return target, teachers, corpus


def run_job(args, work: Path, target: Path, corpus: Path, aligner: str) -> list[dict]:
    """The alternating run; its step rows."""
    import ray

    from fuseserve.trainer.config import load_config
    from fuseserve.trainer.job import run_training

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    metrics = work / "steps.jsonl"
    try:
        cfg = load_config(
            model=str(target),
            data=[str(corpus)],
            block_size=args.block_size,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_steps=args.steps,
            lr=1e-4,
            lam=0.5,
            aligner=aligner,
            preset="spans",
            on_policy=0.5,
            onpolicy_loss="sampled_rkl",
            prompt_tokens=args.block_size - args.max_new_tokens,
            max_new_tokens=args.max_new_tokens,
            storage_path=str(work / "runs"),
            checkpoint_every=args.steps,
            log_every=args.steps,
            use_gpu=args.use_gpu,
            metrics_file=str(metrics),
            name="alternating",
        )
        run_training(cfg)
    finally:
        ray.shutdown()
    return [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]


def measure(args, work: Path) -> list[dict]:
    """Teachers and the aligner up, the run, everything down."""
    from fuseserve import launch
    from fuseserve.aligner.service.app import start_aligner
    from fuseserve.aligner.service.settings import load_settings, parse_teacher_flag

    target, teachers, corpus = build_models(args, work)
    extra = ["--max-sequence-length", "4096"]
    logs = work / "logs"
    procs = {n: launch.start_teacher(n, str(d), logs, extra=extra) for n, d in teachers.items()}
    loop = asyncio.new_event_loop()
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
        return run_job(args, work, target, corpus, f"127.0.0.1:{running.grpc_port}")
    finally:
        if running is not None:
            run(running.stop(1.0))
        for p in procs.values():
            p.stop()


def summarize(rows: list[dict]) -> dict[str, float]:
    """Mean step time of each kind after its first two steps, and the on-policy shares."""
    on = [r for r in rows if r["onpolicy"]][2:]
    off = [r for r in rows if not r["onpolicy"]][2:]
    if not on or not off:
        raise SystemExit("--steps: too few steps to leave two of each kind out (use >= 8)")
    return {
        "on_s": statistics.mean(r["step_s"] for r in on),
        "off_s": statistics.mean(r["step_s"] for r in off),
        "generation": statistics.mean(r["generation_fraction"] for r in on),
        "wait_on": statistics.mean(r["wait_fraction"] for r in on),
        "wait_off": statistics.mean(r["wait_fraction"] for r in off),
        "completion": statistics.mean(r["completion_len_mean"] for r in on),
        "n_on": len(on),
        "n_off": len(off),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (half on-policy)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="sampled tokens")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--use-gpu", action="store_true", help="train on one GPU")
    parser.add_argument("--target", choices=("tiny", "smollm2"), default="tiny")
    args = parser.parse_args()
    if not 0 < args.max_new_tokens < args.block_size:
        parser.error("--max-new-tokens must be between 1 and --block-size - 1")
    work = Path(tempfile.mkdtemp(prefix="bench-onpolicy-"))
    shape = (
        f"{args.target} target, block {args.block_size} (prompt "
        f"{args.block_size - args.max_new_tokens} + {args.max_new_tokens} sampled) x batch "
        f"{args.batch_size} x grad-accum {args.grad_accum}, {args.steps} steps"
    )
    device = "GPU" if args.use_gpu else "CPU"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{platform.machine()} {device}, {stamp}, {shape}", flush=True)
    s = summarize(measure(args, work))
    ratio = s["on_s"] / s["off_s"]
    print("\n| step | ms/step | steps | waiting for the aligner |\n|---|---|---|---|")
    print(f"| off-policy | {s['off_s'] * 1000:.0f} | {s['n_off']} | {s['wait_off']:.0%} |")
    print(f"| on-policy | {s['on_s'] * 1000:.0f} | {s['n_on']} | {s['wait_on']:.0%} |")
    print(
        f"\non-policy steps: generation {s['generation']:.0%} of the step, mean completion "
        f"{s['completion']:.0f} tokens"
    )
    print(f"on-policy / off-policy step time: {ratio:.2f} (goal <= 1.5)")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
