"""The per-worker training function of the Ray Train job (``TorchTrainer(train_loop, ...)``).

Covers one worker's life: build the blocks (deterministic, identical on every worker), load the
target model, wrap it (``ddp``: ``prepare_model``; ``fsdp``: torch FSDP2 ``fully_shard`` per
decoder layer and at the root), resume model, optimizer, scheduler, RNG and step from the latest
checkpoint, take this worker's slice of each global batch (``batch_size × grad_accum`` blocks per
worker per step, in ``grad_accum`` micro-batches of ``batch_size``), pull the fused targets for
exactly those blocks from the prefetch stream, compute ``λ·CLM + (1−λ)·fusion`` per micro-batch
with the step's token counts as denominators (so accumulation equals one big batch), step AdamW
with clipping and a cosine schedule, report metrics every ``log_every`` steps and a checkpoint
every ``checkpoint_every``.

Checkpoints: ``ddp``: rank 0 writes a Hugging Face model directory, ``optimizer.pt``,
``scheduler.pt`` and the data position; ``fsdp``: every rank writes its shards of model and
optimizer with ``torch.distributed.checkpoint`` (``dcp/``), the last checkpoint also holds the
gathered Hugging Face model (``model/``). Both keep each rank's RNG state (``rng/rank<r>.pt``).

Shapes: a micro-batch is input_ids / attention_mask / labels [B, L] and fused ids / probs
[B, L, W], tail [B, L] (B = batch_size, L = longest block, W = widest fused row).

Leaves out: assembling the TorchTrainer (``job``), the losses (``loss``), data (``data``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.data import (
    Block,
    chat_blocks,
    pack_blocks,
    read_conversations,
    read_documents,
    worker_schedule,
)
from fuseserve.trainer.loss import combined_loss, loss_counts
from fuseserve.trainer.prefetch import FusedTargetStream

log = logging.getLogger(__name__)

STATE_FILE = "fuseserve_state.json"
COMPLETE_FILE = "COMPLETE"


def build_blocks(cfg: TrainConfig, tokenizer) -> list[Block]:
    if cfg.chat:
        return chat_blocks(tokenizer, read_conversations(cfg.data), cfg.block_size)
    return pack_blocks(tokenizer, read_documents(cfg.data, cfg.data_field), cfg.block_size)


def data_fingerprint(blocks: list[Block]) -> str:
    import hashlib

    h = hashlib.sha256()
    for b in blocks:
        h.update(b.text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def checkpoint_complete(folder: Path, registered: bool = False) -> bool:
    """All ranks finished writing this checkpoint: rank 0 writes ``COMPLETE`` into it after a
    barrier that follows every rank's upload, so a checkpoint cut off by a kill (some files there,
    some half-copied) is not. ``registered``: Ray's own checkpoint (registered only once every
    rank has reported) and checkpoints from before the marker, for which the files are checked
    instead."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if "world" not in state:  # written before the marker existed (rank 0 alone, DDP)
        registered = True
    if not registered:
        return (folder / COMPLETE_FILE).exists()
    world = int(state.get("world", 0))
    if not all((folder / "rng" / f"rank{r}.pt").exists() for r in range(world)):
        return False
    if state.get("parallel") == "fsdp":
        return (folder / "dcp" / ".metadata").exists() and (folder / "scheduler.pt").exists()
    needed = ("model/config.json", "optimizer.pt", "scheduler.pt")
    return all((folder / n).exists() for n in needed)


def find_latest_checkpoint(storage_path: str, name: str) -> Path | None:
    """The complete checkpoint directory with the highest step under ``storage_path/name``."""
    root = Path(storage_path) / name
    best, best_step = None, -1
    if root.exists():
        for state in root.rglob(STATE_FILE):
            folder = state.parent
            if not checkpoint_complete(folder):
                continue
            step = json.loads(state.read_text()).get("step", -1)
            if step > best_step:
                best, best_step = state.parent, step
    return best


def batch_tensors(blocks: list[Block], fused: list | None, pad_id: int):
    """input_ids, attention_mask, labels [B, L]; fused ids/probs [B, L, W] and tail [B, L]
    (None without fused blocks). A block with a ``loss_mask`` (chat) keeps labels only on its
    masked (assistant) tokens, and a fused row i only where token i + 1 is one of them."""
    length = max(len(b.ids) for b in blocks)
    ids = torch.full((len(blocks), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(blocks), length), dtype=torch.long)
    labels = torch.full((len(blocks), length), -100, dtype=torch.long)
    for r, b in enumerate(blocks):
        n = len(b.ids)
        ids[r, :n] = torch.from_numpy(b.ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.from_numpy(b.ids)
        if b.loss_mask is not None:
            labels[r, :n][~torch.from_numpy(b.loss_mask)] = -100
    if fused is None:
        return ids, mask, labels, None, None, None
    width = max(f.ids.shape[1] for f in fused)
    f_ids = torch.full((len(blocks), length, width), -1, dtype=torch.long)
    f_p = torch.zeros((len(blocks), length, width), dtype=torch.float32)
    f_tail = torch.zeros((len(blocks), length), dtype=torch.float32)
    for r, (b, f) in enumerate(zip(blocks, fused)):
        n, w = len(b.ids), f.ids.shape[1]
        f_ids[r, :n, :w] = torch.from_numpy(f.ids[:n].astype(np.int64))
        f_p[r, :n, :w] = torch.from_numpy(f.probs[:n].astype(np.float32))
        f_tail[r, :n] = torch.from_numpy(f.tail[:n].astype(np.float32))
        if b.loss_mask is not None:
            keep = torch.zeros(n, dtype=torch.bool)
            keep[: n - 1] = torch.from_numpy(b.loss_mask[1:])
            f_ids[r, :n][~keep] = -1
    return ids, mask, labels, f_ids, f_p, f_tail


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases)."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@dataclass
class StepLosses:
    """One optimizer step's losses (sums over its micro-batches) and the tokens it trained on."""

    loss: float
    clm: float
    fusion: float
    tokens: int


MicroBatch = tuple  # the six tensors of ``batch_tensors``


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Let backward synchronise gradients across workers only when ``enabled`` (the last
    micro-batch of a step): DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast of the forward (weights stay fp32) when ``mixed_precision`` is bf16."""
    if cfg.mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    lam: float,
    cfg: TrainConfig,
    device: torch.device,
) -> StepLosses:
    """Forward and backward of every micro-batch of one step, gradients left in ``.grad``.

    Each micro-batch's CLM and fusion terms are sums divided by the label and target counts of
    the whole step, so the gradients (and losses) equal those of one batch of all the blocks.
    """
    n_label = n_target = 0
    for _, _, labels, f_ids, _, _ in micro_batches:
        a, b = loss_counts(labels, f_ids if lam < 1.0 else None)
        n_label, n_target = n_label + a, n_target + b
    sums = torch.zeros(3, dtype=torch.float64)
    tokens = 0
    for i, (ids, mask, labels, f_ids, f_p, f_tail) in enumerate(micro_batches):
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        if f_ids is not None:
            f_ids, f_p, f_tail = f_ids.to(device), f_p.to(device), f_tail.to(device)
        with gradient_sync(model, i == len(micro_batches) - 1):
            with autocast_context(cfg, device):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss, clm, fusion = combined_loss(
                logits,
                labels,
                f_ids,
                f_p,
                lam,
                cfg.fusion_loss,
                cfg.temperature,
                f_tail,
                denominators=(n_label, n_target),
                chunk=cfg.loss_chunk or None,
            )
            loss.backward()
        sums += torch.stack([loss.detach(), clm, fusion]).double().cpu()
        tokens += int(mask.sum())
    return StepLosses(*sums.tolist(), tokens=tokens)


def wrap_model(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Activation checkpointing, then DDP (Ray's ``prepare_model``) or FSDP2 sharding."""
    import ray.train.torch

    if cfg.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"activation_checkpointing: {type(model).__name__} does not support it"
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.parallel == "ddp":
        return ray.train.torch.prepare_model(model)
    from torch.distributed.fsdp import fully_shard

    model.to(ray.train.torch.get_device())
    layer_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module)  # one all-gather per decoder layer
    fully_shard(model)  # embeddings, final norm, lm_head
    return model


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_training_state(resume_dir: Path, model, optimizer, scheduler, cfg, rank) -> None:
    """Optimizer (and, for fsdp, model shards), scheduler and this rank's RNG from a checkpoint."""
    if cfg.parallel == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(resume_dir / "dcp"))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    else:
        optimizer.load_state_dict(torch.load(resume_dir / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(resume_dir / "scheduler.pt", weights_only=True))
    rng_file = resume_dir / "rng" / f"rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from fuseserve.loading import load_tokenizer
    from fuseserve.wire.tokenizer import TokenizerIdentity

    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    blocks = build_blocks(cfg, tokenizer)
    fingerprint = data_fingerprint(blocks)

    # Ray's own checkpoint (worker failure inside this run) or, for a run started again under
    # the same name, the newest complete checkpoint on storage: whichever is further along (a
    # run killed while uploading may have a newer checkpoint than the one Ray registered).
    candidates = [find_latest_checkpoint(cfg.storage_path, cfg.name)]
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        registered = Path(checkpoint.to_directory())
        candidates.append(registered if checkpoint_complete(registered, True) else None)
    resume_dir = max(
        (c for c in candidates if c is not None),
        key=lambda c: json.loads((c / STATE_FILE).read_text())["step"],
        default=None,
    )
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    start_step = 0
    if resume_dir is not None:
        state = json.loads((resume_dir / STATE_FILE).read_text())
        if state["data_fingerprint"] != fingerprint:
            raise RuntimeError(
                f"checkpoint {resume_dir} was trained on other data; use a new run name"
            )
        if state.get("parallel", "ddp") != cfg.parallel:
            raise RuntimeError(
                f"parallel: checkpoint {resume_dir} was written with --parallel "
                f"{state.get('parallel', 'ddp')}; resume with the same mode or a new run name"
            )
        start_step = int(state["step"])
        if rank == 0:
            log.info("resuming from %s at step %d", resume_dir, start_step)
    # fsdp loads the starting weights and then its shards from the checkpoint
    from_hf = resume_dir is not None and cfg.parallel == "ddp"
    source = str(resume_dir / "model") if from_hf else cfg.model
    model = wrap_model(AutoModelForCausalLM.from_pretrained(source, dtype=dtype), cfg)
    device = ray.train.torch.get_device()
    optimizer = make_optimizer(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps(), cfg.max_steps)
    if resume_dir is not None:
        load_training_state(resume_dir, model, optimizer, scheduler, cfg, rank)

    per_step = cfg.blocks_per_step
    schedule = worker_schedule(len(blocks), cfg.seed, rank, world, per_step, start_step)
    stream = None
    if cfg.fused:
        steps_left = cfg.max_steps - start_step
        order_source = worker_schedule(len(blocks), cfg.seed, rank, world, per_step, start_step)
        order = (i for _, (_, _, idxs) in zip(range(steps_left), order_source) for i in idxs)
        target_fp = TokenizerIdentity.from_hf(tokenizer).fingerprint
        stream = FusedTargetStream(
            cfg.aligner,
            blocks,
            order,
            depth=cfg.fused_prefetch_depth(),
            target_fingerprint=target_fp,
            k=cfg.k,
            teachers=cfg.teachers,
            preset=cfg.preset,
            options_json=json.dumps(cfg.fusion_options) if cfg.fusion_options else "",
            timeout_s=cfg.aligner_timeout_s,
        ).start()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    metrics_file = Path(cfg.metrics_file) if cfg.metrics_file and rank == 0 else None
    # a sharded model answers only when every rank runs it: all ranks evaluate under fsdp
    heldout = HeldOut.load(cfg) if rank == 0 or cfg.parallel == "fsdp" else None
    if heldout is not None and start_step == 0:
        heldout.record(model, tokenizer, 0, 0, metrics_file)
    model.train()
    if rank == 0:
        log.info(
            "global batch: %d blocks = %d x %d micro-batches x %d workers (<= %d tokens)",
            per_step * world,
            cfg.batch_size,
            cfg.grad_accum,
            world,
            per_step * world * cfg.block_size,
        )
    try:
        for step in range(start_step, cfg.max_steps):
            _, epoch, idxs = next(schedule)
            t0 = time.perf_counter()
            wait_before = stream.stats.wait_s if stream else 0.0
            micro_batches = []
            for m in range(0, per_step, cfg.batch_size):
                batch = [blocks[i] for i in idxs[m : m + cfg.batch_size]]
                fused = [stream.get(b) for b in batch] if stream else None
                micro_batches.append(batch_tensors(batch, fused, pad_id))
            waited = (stream.stats.wait_s - wait_before) if stream else 0.0
            lam = cfg.lam_at(step) if stream else 1.0
            losses = accumulate_gradients(model, micro_batches, lam, cfg, device)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            done = step + 1
            tokens = losses.tokens * world  # this worker's count times the workers
            metrics = {
                "step": done,
                "epoch": epoch,
                "loss": losses.loss,
                "clm_loss": losses.clm,
                "fusion_loss": losses.fusion,
                "lam": lam,
                "lr": scheduler.get_last_lr()[0],
                "global_batch_tokens": tokens,
                "tokens_per_s": tokens / elapsed,
                "step_s": elapsed,
                "wait_fraction": waited / elapsed if elapsed else 0.0,
                "cache_hit_rate": (
                    stream.stats.cache_hits / max(stream.stats.received, 1) if stream else 0.0
                ),
                "blocks_seen": done * per_step * world,
            }
            if device.type == "cuda":
                metrics["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            if metrics_file is not None:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if heldout is not None and heldout.due(done, cfg):
                heldout.record(model, tokenizer, done, metrics["blocks_seen"], metrics_file)
                model.train()
            save = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
            if save:
                parts = (model, tokenizer, optimizer, scheduler)
                save_checkpoint(cfg, parts, metrics, rank, world, fingerprint)
            elif done % cfg.log_every == 0:
                ray.train.report(metrics)
            if rank == 0 and (done % cfg.log_every == 0 or save):
                log.info(
                    "step %d/%d loss %.4f (clm %.4f, fusion %.4f) global batch %d tokens, "
                    "%.0f tok/s wait %.0f%%",
                    done,
                    cfg.max_steps,
                    metrics["loss"],
                    metrics["clm_loss"],
                    metrics["fusion_loss"],
                    tokens,
                    metrics["tokens_per_s"],
                    100 * metrics["wait_fraction"],
                )
    finally:
        if stream is not None:
            stream.close()


class HeldOut:
    """Held-out bits per byte during training (rank 0), appended to the metrics file.

    Rows look like ``{"step": 20, "blocks_seen": 160, "tokens_seen": 20480, "eval_bpb":
    {"code": 1.93, ...}}``; ``tokens_seen`` counts target tokens of the blocks trained on so far.
    """

    def __init__(self, domains: dict[str, list[str]], max_length: int, block_size: int) -> None:
        self.domains = domains
        self.max_length = max_length
        self.block_size = block_size

    @classmethod
    def load(cls, cfg: TrainConfig) -> HeldOut | None:
        if not cfg.eval_data:
            return None
        texts = {d: read_documents(paths) for d, paths in cfg.eval_domains().items()}
        return cls(texts, cfg.eval_max_length, cfg.block_size)

    @staticmethod
    def due(done: int, cfg: TrainConfig) -> bool:
        return done == cfg.max_steps or bool(cfg.eval_every and done % cfg.eval_every == 0)

    def record(self, model, tokenizer, step: int, blocks_seen: int, metrics_file) -> dict:
        from fuseserve.trainer.evaluate import bits_per_byte

        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.eval()
        bpb = {
            domain: bits_per_byte(unwrapped, tokenizer, texts, self.max_length).value
            for domain, texts in self.domains.items()
        }
        row = {
            "step": step,
            "blocks_seen": blocks_seen,
            "tokens_seen": blocks_seen * self.block_size,
            "eval_bpb": bpb,
        }
        log.info("held-out BPB at step %d: %s", step, json.dumps(bpb))
        if metrics_file is not None:
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole model's state dict on CPU, gathered from the FSDP shards (a collective: every
    rank calls it; ranks other than 0 get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_checkpoint(cfg, parts, metrics, rank, world, fingerprint) -> None:
    """Every rank writes its RNG state (and, under fsdp, its model and optimizer shards); rank 0
    the scheduler, the data position and a Hugging Face model (ddp: always; fsdp: at the end).
    Ray merges the ranks' folders into one checkpoint directory."""
    import ray.train
    from transformers import AutoModelForCausalLM

    model, tokenizer, optimizer, scheduler = parts
    final = metrics["step"] == cfg.max_steps
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "rng").mkdir()
        torch.save(rng_state(), out / "rng" / f"rank{rank}.pt")
        if cfg.parallel == "fsdp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))
        elif rank == 0:
            torch.save(optimizer.state_dict(), out / "optimizer.pt")
        if cfg.parallel == "ddp" and rank == 0:
            (model.module if hasattr(model, "module") else model).save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
        elif cfg.parallel == "fsdp" and final:
            full = full_model_state(model)  # a collective: every rank gathers
            if rank == 0:
                dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
                plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
                plain.load_state_dict(full)
                plain.save_pretrained(out / "model")
                tokenizer.save_pretrained(out / "model")
        if rank == 0:
            torch.save(scheduler.state_dict(), out / "scheduler.pt")
            state = {
                "step": metrics["step"],
                "epoch": metrics["epoch"],
                "blocks_seen": metrics["blocks_seen"],
                "data_fingerprint": fingerprint,
                "parallel": cfg.parallel,
                "world": world,
                "config": cfg.model_dump(mode="json"),
            }
            (out / STATE_FILE).write_text(json.dumps(state, indent=1))
        # the name is rank 0's (Ray broadcasts it); a timestamp keeps a resumed run from
        # writing into a folder a killed run left half-written
        dir_name = f"checkpoint_step{metrics['step']:07d}_{time.time_ns()}"
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=dir_name,
        )
    torch.distributed.barrier()  # every rank's upload has returned
    persisted = Path(cfg.storage_path) / cfg.name / dir_name
    if rank == 0 and "://" not in cfg.storage_path:
        if persisted.is_dir():
            (persisted / COMPLETE_FILE).write_text(str(metrics["step"]))
        else:
            log.warning("checkpoint not found at %s: it cannot be resumed from", persisted)
