"""Benchmark: a fused training run rides out teacher and aligner outages and a Redis restart.

Setup: redis-server, two ``fuseserve teacher`` processes (tiny Llama models, fixed seed, on the
Mistral v1 SentencePiece and SmolLM2 byte-level BPE tokenizers) and the aligner as a process with
Redis, each on a fixed port so that a restarted one comes back where the others look for it. Two
``fuseserve train`` jobs (Ray Train, one worker, the same seed, blocks and settings), each on a
cold cache (Redis and the aligner restarted before it):

1. undisturbed;
2. disturbed: once it has trained a few steps, the ``spm`` teacher is SIGKILLed and started again
   ``--teacher-outage`` seconds later; after a few more steps the aligner is SIGKILLed and started
   again ``--aligner-outage`` seconds later; then Redis is SIGKILLed and started again at once.

Both must end with exit status 0 and bit-identical weights (the outages are pauses, nothing is
trained without its fused targets). Prints the wall-clock time of both runs, the extra time of
the disturbed one against the outages' length, and the seconds the disturbed run's steps
report in ``waiting_for_targets_seconds``.

Usage: python bench/bench_chaos.py [--teacher-outage 60] [--aligner-outage 30] [--steps 60]
Exit status 1 if a run fails or the weights differ. ``tests/trainer/test_chaos.py`` runs it short.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fuseserve import launch, shipped
from fuseserve.teacher.tiny import save_tiny_llama

TEACHER_ARGS = ["--max-sequence-length", "1024", "--max-k", "32", "--batch-wait-ms", "2"]


@dataclass
class Stack:
    """Redis, the two teachers and the aligner as processes on fixed ports."""

    root: Path
    models: dict[str, Path]
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, launch.ServiceProcess] = field(default_factory=dict)

    def start(self, name: str) -> None:
        """Start (or start again) one part and wait until it serves."""
        logs, port = self.root / "logs", self.ports.setdefault(name, launch.free_port())
        if name == "redis":
            self.procs[name] = launch.start_redis(logs, port=port)
        elif name == "aligner":
            self.procs[name] = launch.start_aligner(
                {t: [f"127.0.0.1:{self.ports[t]}"] for t in self.models},
                logs,
                grpc_port=port,
                rest_port=self.ports.setdefault("rest", launch.free_port()),
                extra=["--target-tokenizer", str(self.models["spm"])],
                env={
                    "REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
                    "FUSESERVE_ALIGNER_VOCAB_MAP_DIR": str(self.root / "vocab-maps"),
                },
            )
            launch.wait_grpc_serving(self.procs[name], 600)
        else:
            proc = launch.start_teacher(name, str(self.models[name]), logs, port, TEACHER_ARGS)
            self.procs[name] = proc
            launch.wait_grpc_serving(proc, 300)

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def start_all(self) -> None:
        for name in ("redis", *self.models, "aligner"):
            self.start(name)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.stop(5)

    @property
    def aligner_address(self) -> str:
        return f"127.0.0.1:{self.ports['aligner']}"


def make_stack(root: Path) -> Stack:
    models = {
        "spm": save_tiny_llama(shipped.mistral_v1_tokenizer(), root / "spm", seed=1),
        "bpe": save_tiny_llama(shipped.smollm2_tokenizer(), root / "bpe", seed=2),
    }
    return Stack(root, models)


def corpus(root: Path) -> Path:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    path = root / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in ("assignment", "for", "class", "with", "try")))
    return path


def train_args(stack: Stack, data: Path, name: str, steps: int) -> list[str]:
    settings = {
        "model": stack.models["spm"], "data": data, "aligner": stack.aligner_address,
        "block-size": 64, "batch-size": 2, "max-steps": steps, "num-workers": 1,
        "torch-threads": 1, "lam": 0.5, "lr": 1e-3, "seed": 7, "prefetch-depth": 4,
        "checkpoint-every": 20, "storage-path": stack.root / "runs", "name": name,
        "metrics-file": stack.root / f"{name}.jsonl", "export-dir": stack.root / f"{name}-model",
    }  # fmt: skip
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    return [sys.executable, "-m", "fuseserve.cli", "train", *flags]


def steps_done(stack: Stack, name: str) -> int:
    path = stack.root / f"{name}.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]
    return max((row["step"] for row in rows), default=0)


def cold_cache(stack: Stack) -> None:
    """Redis and the aligner started again: nothing of an earlier run is cached."""
    for name in ("aligner", "redis"):
        stack.procs[name].stop(5)
    stack.start("redis")
    stack.start("aligner")


def outage(stack: Stack, name: str, seconds: float, log) -> None:
    log(f"SIGKILL {name}; back in {seconds:g} s")
    stack.kill(name)
    time.sleep(seconds)
    stack.start(name)
    log(f"{name} serving again")


def disturb(stack: Stack, run: subprocess.Popen, name: str, args, log) -> None:
    """The outages, each once the run has trained a few more steps."""

    def after(step: int) -> None:
        launch.wait_until(
            lambda: steps_done(stack, name) >= step or run.poll() is not None,
            900,
            f"step {step} of the run",
            interval_s=0.05,
        )
        if run.poll() is not None:
            raise RuntimeError(f"the run ended (rc {run.returncode}) before step {step}")

    after(3)
    outage(stack, "spm", args.teacher_outage, log)
    after(steps_done(stack, name) + 3)
    outage(stack, "aligner", args.aligner_outage, log)
    after(steps_done(stack, name) + 3)
    log("SIGKILL redis; restarted at once")
    stack.kill("redis")
    stack.start("redis")


def train(stack: Stack, data: Path, name: str, args, log, disturbed: bool) -> tuple[int, float]:
    """One ``fuseserve train`` job: (exit status, wall-clock seconds)."""
    cold_cache(stack)
    start = time.monotonic()
    with open(stack.root / f"{name}.log", "wb") as out:
        run = subprocess.Popen(train_args(stack, data, name, args.steps), stdout=out, stderr=out)
        try:
            if disturbed:
                disturb(stack, run, name, args, log)
            rc = run.wait(timeout=3600)
        finally:
            if run.poll() is None:
                run.kill()
    return rc, time.monotonic() - start


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    first = AutoModelForCausalLM.from_pretrained(a).state_dict()
    second = AutoModelForCausalLM.from_pretrained(b).state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def waited(stack: Stack, name: str) -> float:
    rows = [json.loads(line) for line in (stack.root / f"{name}.jsonl").read_text().splitlines()]
    return sum(row.get("waiting_for_targets_seconds", 0.0) for row in rows)


def run_chaos(root: Path, args, log=print) -> dict:
    """Both runs on a fresh stack under ``root``; the figures of the report."""
    stack = make_stack(root)
    data = corpus(root)
    stack.start_all()
    try:
        calm_rc, calm_s = train(stack, data, "calm", args, log, disturbed=False)
        log(f"undisturbed run: rc {calm_rc} in {calm_s:.1f} s")
        chaos_rc, chaos_s = train(stack, data, "chaos", args, log, disturbed=True)
        log(f"disturbed run: rc {chaos_rc} in {chaos_s:.1f} s")
    finally:
        stack.stop_all()
    identical = calm_rc == chaos_rc == 0 and same_weights(root / "calm-model", root / "chaos-model")
    return {
        "calm_rc": calm_rc, "chaos_rc": chaos_rc, "calm_s": calm_s, "chaos_s": chaos_s,
        "outages_s": args.teacher_outage + args.aligner_outage,
        "waited_s": waited(stack, "chaos") if chaos_rc == 0 else float("nan"),
        "identical": identical,
    }  # fmt: skip


def report(r: dict, args) -> str:
    extra = r["chaos_s"] - r["calm_s"]
    return "\n".join(
        [
            f"machine: {platform.machine()}, {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}; {args.steps} steps, teacher outage "
            f"{args.teacher_outage:g} s, aligner outage {args.aligner_outage:g} s, Redis restart",
            "",
            "| run | exit status | wall clock (s) |",
            "|---|---|---|",
            f"| undisturbed | {r['calm_rc']} | {r['calm_s']:.1f} |",
            f"| disturbed | {r['chaos_rc']} | {r['chaos_s']:.1f} |",
            "",
            f"extra wall clock of the disturbed run: {extra:.1f} s for {r['outages_s']:g} s of "
            f"outages (ratio {extra / r['outages_s']:.2f}); its steps waited "
            f"{r['waited_s']:.1f} s for targets; final weights bit-identical: {r['identical']}",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-outage", type=float, default=60.0)
    parser.add_argument("--aligner-outage", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        result = run_chaos(Path(tmp), args, log=lambda m: print(f"[{time.strftime('%X')}] {m}"))
    print(report(result, args))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
