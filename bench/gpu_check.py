"""The GPU check's stages, one per call, each printing a Markdown table (issue #24).

Run by ``bench/gpu_check.sh``, which installs the bundle's wheels, sets PYTHONPATH and gives each
stage its own timeout. Stages:

- ``env``: the interpreter, torch and CUDA, where each package the check imports comes from, and
  an import of every fuseserve module the other stages use;
- ``teacher``: a tiny Llama and SmolLM2-135M (same architecture, seeded random weights; the real
  weights do not travel) served over gRPC vs in-process, bf16 on CUDA, 512 and 2048 tokens,
  tokens/s and peak GPU memory (``bench_teacher.run``);
- ``loss``: the fused loss and its backward on synthetic logits [1, L, V] (V = 32k and 128k):
  milliseconds and peak GPU memory per kind (``bench_trainer.MEMORY_KINDS``), fp32 and bf16 logits;
- ``train``: the recipe in this process (no Ray: ``LocalWorker`` stands in for Ray's worker) on
  SmolLM2-135M, bf16 autocast, ``--parallel fsdp`` (FSDP2 ``fully_shard`` in a process group of
  one) or ``ddp`` (the model on the device): fused (λ = 0.9, two tiny teacher processes and an
  aligner in this process) with a cold then warm aligner cache, and CLM only; ms/step, waiting
  for targets, loss, peak GPU memory, and a checkpoint at the last step.

``--device cpu`` runs the same code on the CPU with small sizes (the dry run's mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Sizes:
    layers: int | None  # SmolLM2's decoder layers (None: its own 30)
    lengths: tuple[int, ...]  # teacher: tokens per sequence
    rounds: int  # teacher: timed rounds
    vocabs: tuple[int, ...]  # loss: vocabulary sizes
    loss_length: int  # loss: positions
    dtypes: tuple[str, ...]  # loss: logits dtypes
    steps: int  # train: optimizer steps per run
    block: int  # train: tokens per block
    batch: int  # train: blocks per micro-batch
    accum: int  # train: micro-batches per step


SIZES = {
    "cuda": Sizes(
        layers=None, lengths=(512, 2048), rounds=2, vocabs=(32000, 128256), loss_length=2048,
        dtypes=("float32", "bfloat16"), steps=8, block=1024, batch=4, accum=2,
    ),
    "cpu": Sizes(
        layers=2, lengths=(64,), rounds=1, vocabs=(32000,), loss_length=256,
        dtypes=("float32",), steps=3, block=64, batch=2, accum=2,
    ),
}  # fmt: skip


@dataclass
class Models:
    tiny: Path  # a tiny Llama on the Mistral v1 tokenizer (teacher benchmark)
    smollm2: Path  # SmolLM2-135M's architecture and tokenizer, seeded random weights
    teachers: dict[str, Path]  # the fused runs' two tiny teachers (SentencePiece, BPE)


def build_smollm2(source: Path, dest: Path, layers: int | None) -> None:
    """SmolLM2-135M from its shipped config with seeded random fp32 weights (``layers``: fewer
    decoder layers, for the CPU), saved with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(dest)
    for path in source.iterdir():
        if path.name != "config.json":
            shutil.copy2(path, dest / path.name)


def ensure_models(bundle: Path, work: Path, device: str) -> Models:
    """The models every stage uses, built once per work folder (a ``.done`` file marks each)."""
    from transformers import AutoTokenizer

    from fuseserve.teacher.tiny import save_tiny_llama

    folder = work / "models"
    models = Models(
        tiny=folder / "tiny",
        smollm2=folder / "smollm2-135m",
        teachers={"spm": folder / "t-spm", "bpe": folder / "t-bpe"},
    )
    spm = bundle / "models" / "mistral-v1"
    bpe = bundle / "models" / "smollm2-135m"
    jobs = {
        models.tiny: lambda d: save_tiny_llama(AutoTokenizer.from_pretrained(spm), d, seed=0),
        models.smollm2: lambda d: build_smollm2(bpe, d, SIZES[device].layers),
        models.teachers["spm"]: lambda d: save_tiny_llama(AutoTokenizer.from_pretrained(spm), d, 1),
        models.teachers["bpe"]: lambda d: save_tiny_llama(AutoTokenizer.from_pretrained(bpe), d, 2),
    }
    for dest, build in jobs.items():
        if not (dest / ".done").exists():
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            build(dest)
            (dest / ".done").touch()
    return models


def device_of(args) -> torch.device:
    """cuda:0 or cpu (an index: ``torch.cuda.set_device`` refuses a bare "cuda")."""
    return torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak(device: torch.device) -> None:
    """Free what earlier rows left (a backend, a model) and start a new peak."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# ------------------------------------------------------------------------------------ env
CHECKED_IMPORTS = (
    "torch", "transformers", "tokenizers", "accelerate", "sentencepiece", "numpy", "grpc",
    "google.protobuf", "grpc_health.v1", "grpc_reflection.v1alpha", "pydantic", "pydantic_core",
    "pydantic_settings", "rapidfuzz", "fastapi", "starlette", "uvicorn", "prometheus_client",
    "yaml", "httpx", "fuseserve.wire.v1.teacher_pb2_grpc", "fuseserve.wire.v1.aligner_pb2_grpc",
    "fuseserve.teacher.server", "fuseserve.teacher.hf_backend", "fuseserve.aligner.service.app",
    "fuseserve.trainer.recipe", "fuseserve.trainer.loss", "fuseserve.launch", "fuseserve.cli",
)  # fmt: skip


def stage_env(args) -> bool:
    """Interpreter, torch/CUDA facts, and where each import comes from; False if one fails."""
    print(f"python {platform.python_version()} at {sys.executable}, {os.cpu_count()} cpus")
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("error: torch.cuda.is_available() is False")
            return False
        props = torch.cuda.get_device_properties(0)
        gib = props.total_memory / 2**30
        print(f"GPU {props.name}, {gib:.1f} GiB, sm_{props.major}{props.minor}")
        print(f"bf16 supported: {torch.cuda.is_bf16_supported()}, NCCL {torch.cuda.nccl.version()}")
    print("\n| module | version | from |\n|---|---|---|")
    ok = True
    for name in CHECKED_IMPORTS:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # every failure is a row
            print(f"| {name} | IMPORT FAILED | {type(exc).__name__}: {exc} |")
            ok = False
            continue
        version = getattr(module, "__version__", getattr(module, "VERSION", ""))
        where = str(Path(getattr(module, "__file__", "") or "?").parent)
        print(f"| {name} | {version} | {where} |")
    return ok


# ------------------------------------------------------------------------------------ teacher
def stage_teacher(args) -> bool:
    """Served vs in-process for the tiny Llama and SmolLM2-135M at each length."""
    import bench_teacher

    sizes = SIZES[args.device]
    models = ensure_models(args.bundle, args.work, args.device)
    device = device_of(args)
    head = "| model | tokens/seq | device, dtype | in-process tok/s | served tok/s | ratio "
    print(head + "| B/token k=10 f32/f16 | peak GPU MiB |\n|---|---|---|---|---|---|---|---|")
    ok = True
    for label, folder in (("tiny", models.tiny), ("smollm2-135m", models.smollm2)):
        for length in sizes.lengths:
            reset_peak(device)
            try:
                r = bench_teacher.run(
                    label, length, sizes.rounds, 10, 8, spec=str(folder), device=args.device
                )
            except Exception:  # the next row may still run
                traceback.print_exc()
                print(f"| {label} | {length} | FAILED (traceback above) |")
                ok = False
                continue
            print(
                f"| {label} | {length} | {r['device']}, {r['dtype']} | "
                f"{r['in_process_tok_s']:,.0f} | {r['served_tok_s']:,.0f} | {r['ratio']:.2f} | "
                f"{r['bytes_per_token_f32']:.0f} / {r['bytes_per_token_f16']:.0f} | "
                f"{mib(peak_mib(device))} |",
                flush=True,
            )
    return ok


# ------------------------------------------------------------------------------------ loss
def loss_row(kind: str, vocab: int, dtype: str, args) -> str:
    """One kind of loss and its backward: ms and peak memory above the inputs."""
    from bench_trainer import loss_inputs, loss_of

    device = device_of(args)
    length = SIZES[args.device].loss_length
    logits, labels, ids, probs = loss_inputs(length, vocab, 20, device, getattr(torch, dtype))
    reset_peak(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    loss = loss_of(kind, logits, labels, ids, probs, chunk=1024)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - start) * 1000
    peak = peak_mib(device)
    extra = None if peak is None else peak - base / 2**20
    value = loss.detach().item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{kind}: loss is {value}")
    return f"| {vocab:,} | {dtype} | {kind} | {value:.4f} | {ms:,.1f} | {mib(extra)} |"


def stage_loss(args) -> bool:
    """Every kind of loss at each vocabulary size and logits dtype (first call warms up)."""
    from bench_trainer import MEMORY_KINDS

    length = SIZES[args.device].loss_length
    print(f"loss + backward, logits [1, {length}, V], W = 20, chunks of 1,024 positions")
    print("| V | logits | kind | loss | ms | peak MiB over inputs |\n|---|---|---|---|---|---|")
    with contextlib.suppress(Exception):
        loss_row("clm", 32000, "float32", args)  # warm-up (kernels, allocator); not printed
    ok = True
    for vocab in SIZES[args.device].vocabs:
        for dtype in SIZES[args.device].dtypes:
            for kind in MEMORY_KINDS:
                try:
                    print(loss_row(kind, vocab, dtype, args), flush=True)
                except Exception as exc:  # the next row may still run
                    print(f"| {vocab:,} | {dtype} | {kind} | FAILED: {type(exc).__name__}: "
                          f"{exc} | | |")  # fmt: skip
                    ok = False
    return ok


# ------------------------------------------------------------------------------------ train
class LocalWorker:
    """Rank 0 of 1 in this process, in place of Ray's worker (``recipe.RayWorker``): the model
    goes to ``device`` (no DDP wrapper with one worker), reports are kept, a checkpoint folder is
    copied where Ray would persist it, and the barrier is the process group's when there is one."""

    rank, world = 0, 1

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.reports: list[dict] = []

    def registered_checkpoint(self) -> Path | None:
        return None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict, folder: Path | None = None, dir_name: str = "") -> None:
        self.reports.append(metrics)
        if folder is not None:
            shutil.copytree(folder, Path(self.cfg.storage_path) / self.cfg.name / dir_name)

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


@contextlib.contextmanager
def process_group(parallel: str, device: torch.device):
    """A process group of one (NCCL on CUDA, gloo on the CPU) for FSDP2; nothing for ddp."""
    if parallel != "fsdp":
        yield
        return
    from fuseserve.launch import free_port

    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    address = f"tcp://127.0.0.1:{free_port()}"
    torch.distributed.init_process_group(backend, init_method=address, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def fusion_services(work: Path, teachers: dict[str, Path], target: Path):
    """Teacher processes and an aligner in this process (its own event loop thread); yields
    the aligner's gRPC address. Vocabulary maps are kept in ``work/maps`` across stages."""
    from fuseserve import launch
    from fuseserve.aligner.service.app import start_aligner
    from fuseserve.aligner.service.settings import load_settings, parse_teacher_flag

    extra = ["--max-sequence-length", "4096"]
    logs = work / "logs"
    procs = {n: launch.start_teacher(n, str(d), logs, extra=extra) for n, d in teachers.items()}
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    running = None
    try:
        for proc in procs.values():
            launch.wait_grpc_serving(proc, 300)
        flags = [parse_teacher_flag(f"{n}=127.0.0.1:{p.port}") for n, p in procs.items()]
        settings = load_settings(
            teachers=flags, target_tokenizer=str(target), rest_port=0, grpc_port=0,
            vocab_map_dir=str(work / "maps"), info_refresh_s=0, log_level="warning",
        )  # fmt: skip

        async def start():
            aligner = await start_aligner(settings)
            await aligner.wait_ready(600)
            return aligner

        running = asyncio.run_coroutine_threadsafe(start(), loop).result(660)
        yield f"127.0.0.1:{running.grpc_port}"
    finally:
        if running is not None:
            asyncio.run_coroutine_threadsafe(running.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        for proc in procs.values():
            proc.stop()


def train_run(name: str, settings: dict, device: torch.device) -> dict:
    """One run of the recipe with ``LocalWorker``; its summary from the metrics file."""
    from fuseserve.trainer.config import load_config
    from fuseserve.trainer.recipe import FusionRecipe

    metrics = Path(settings["storage_path"]) / f"{name}.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.unlink(missing_ok=True)
    cfg = load_config(**settings, name=name, metrics_file=str(metrics))
    reset_peak(device)
    FusionRecipe(cfg, LocalWorker(cfg, device)).run()
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    if not all(math.isfinite(r["loss"]) for r in rows):
        raise FloatingPointError(f"{name}: a loss is not finite: {[r['loss'] for r in rows]}")
    measured = rows[min(2, len(rows) - 1) :]  # after warm-up steps
    return {
        "ms": 1000 * statistics.mean(r["step_s"] for r in measured),
        "tok_s": statistics.mean(r["tokens_per_s"] for r in measured),
        "wait": statistics.mean(r["wait_fraction"] for r in measured),
        "hits": rows[-1]["cache_hit_rate"],
        "loss": f"{rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}",
        "peak": max((r.get("peak_memory_mib", 0.0) for r in rows), default=0.0) or None,
        "checkpoint": bool(list((Path(settings["storage_path"]) / name).glob("checkpoint_*"))),
    }


def train_settings(args, target: Path, corpus: Path) -> dict:
    sizes = SIZES[args.device]
    return dict(
        model=str(target), data=[str(corpus)], block_size=sizes.block,
        batch_size=sizes.batch, grad_accum=sizes.accum, max_steps=sizes.steps,
        lr=1e-4, loss_chunk=1024, use_gpu=args.device == "cuda", parallel=args.parallel,
        mixed_precision="bf16", checkpoint_every=sizes.steps, log_every=sizes.steps,
        storage_path=str(args.work / f"runs-{args.parallel}"),
    )  # fmt: skip


def write_corpus(path: Path) -> Path:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)))
    return path


def stage_train(args) -> bool:
    """Fused (cold, then warm cache) and CLM-only runs of the recipe on SmolLM2-135M."""
    sizes, device = SIZES[args.device], device_of(args)
    models = ensure_models(args.bundle, args.work, args.device)
    settings = train_settings(args, models.smollm2, write_corpus(args.work / "corpus.txt"))
    print(
        f"SmolLM2-135M target, {args.parallel}, bf16 autocast (fp32 master weights), "
        f"{sizes.steps} steps of {sizes.accum} micro-batches x {sizes.batch} x "
        f"{sizes.block} tokens, {args.device}; means after 2 warm-up steps"
    )
    rows: list[tuple[str, dict | None]] = []
    ok = True
    services = fusion_services(args.work, models.teachers, models.smollm2)
    with services as aligner, process_group(args.parallel, device):
        for label, extra in (
            ("fused, cold cache", {"aligner": aligner, "lam": 0.9}),
            ("fused, warm cache", {"aligner": aligner, "lam": 0.9}),
            ("CLM only", {"lam": 1.0}),
        ):
            name = f"{args.parallel}-{label.replace(', ', '-').replace(' ', '-')}"
            try:
                rows.append((label, train_run(name, {**settings, **extra}, device)))
            except Exception:  # the next run may still work
                traceback.print_exc()
                rows.append((label, None))
                ok = False
            shutil.rmtree(Path(settings["storage_path"]) / name, ignore_errors=True)
    return print_train_table(rows) and ok


def print_train_table(rows: list[tuple[str, dict | None]]) -> bool:
    """The runs' table; False if a run failed or wrote no checkpoint."""
    ok = True
    head = "| run | ms/step | tokens/s | waiting for targets | aligner cache hits | loss "
    print(f"\n{head}| peak GPU MiB | checkpoint |\n|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        if r is None:
            print(f"| {label} | FAILED (traceback above) | | | | | | |")
            ok = False
            continue
        print(
            f"| {label} | {r['ms']:,.0f} | {r['tok_s']:,.0f} | {r['wait']:.0%} | {r['hits']:.0%} | "
            f"{r['loss']} | {mib(r['peak'])} | {'written' if r['checkpoint'] else 'MISSING'} |"
        )
        ok &= r["checkpoint"]
    return ok


STAGES = {"env": stage_env, "teacher": stage_teacher, "loss": stage_loss, "train": stage_train}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--device", choices=sorted(SIZES), default="cuda")
    parser.add_argument("--bundle", type=Path, default=Path("gpu-bundle"))
    parser.add_argument("--work", type=Path, required=True, help="models, maps, runs, logs")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="fsdp")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    ok = STAGES[args.stage](args)
    print(f"\n{args.stage}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
