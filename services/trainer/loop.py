"""The per-worker training function of the Ray Train job (``TorchTrainer(train_loop, ...)``).

Covers one worker's life: build the blocks (deterministic, identical on every worker), load the
target model (or resume model, optimizer, scheduler and step from the latest checkpoint), take
this worker's slice of each global batch, pull the fused targets for exactly those blocks from
the prefetch stream, compute ``λ·CLM + (1−λ)·fusion``, step AdamW with clipping and a cosine
schedule, report metrics every ``log_every`` steps and a checkpoint every ``checkpoint_every``
(rank 0 writes: a Hugging Face model directory, optimizer, scheduler, and the data position).

Leaves out: assembling the TorchTrainer (``job``), the losses (``loss``), data (``data``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.data import Block, pack_blocks, read_documents, worker_schedule
from fuseserve.trainer.loss import combined_loss
from fuseserve.trainer.prefetch import FusedTargetStream

log = logging.getLogger(__name__)

STATE_FILE = "fuseserve_state.json"


def build_blocks(cfg: TrainConfig, tokenizer) -> list[Block]:
    return pack_blocks(tokenizer, read_documents(cfg.data, cfg.data_field), cfg.block_size)


def data_fingerprint(blocks: list[Block]) -> str:
    import hashlib

    h = hashlib.sha256()
    for b in blocks:
        h.update(b.text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def find_latest_checkpoint(storage_path: str, name: str) -> Path | None:
    """The checkpoint directory with the highest step under ``storage_path/name`` (local only)."""
    root = Path(storage_path) / name
    best, best_step = None, -1
    if root.exists():
        for state in root.rglob(STATE_FILE):
            folder = state.parent
            needed = ("model/config.json", "optimizer.pt", "scheduler.pt")
            if not all((folder / n).exists() for n in needed):
                continue  # interrupted while being written
            try:
                step = json.loads(state.read_text())["step"]
            except (OSError, ValueError, KeyError):
                continue
            if step > best_step:
                best, best_step = state.parent, step
    return best


def batch_tensors(blocks: list[Block], fused: list | None, pad_id: int):
    """input_ids, attention_mask, labels [B, L]; fused ids/probs [B, L, W] and tail [B, L]
    (None without fused blocks)."""
    length = max(len(b.ids) for b in blocks)
    ids = torch.full((len(blocks), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(blocks), length), dtype=torch.long)
    labels = torch.full((len(blocks), length), -100, dtype=torch.long)
    for r, b in enumerate(blocks):
        n = len(b.ids)
        ids[r, :n] = torch.from_numpy(b.ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.from_numpy(b.ids)
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
    return ids, mask, labels, f_ids, f_p, f_tail


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases)."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    from fuseserve.aligner.tokenview import TokenizerView
    from fuseserve.loading import load_tokenizer

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
        candidates.append(Path(checkpoint.to_directory()))
    resume_dir = max(
        (c for c in candidates if c is not None and (c / STATE_FILE).exists()),
        key=lambda c: json.loads((c / STATE_FILE).read_text())["step"],
        default=None,
    )
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    source = str(resume_dir / "model") if resume_dir else cfg.model
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    start_step = 0
    if resume_dir is not None:
        state = json.loads((resume_dir / STATE_FILE).read_text())
        if state["data_fingerprint"] != fingerprint:
            raise RuntimeError(
                f"checkpoint {resume_dir} was trained on other data; use a new run name"
            )
        start_step = int(state["step"])
        if rank == 0:
            log.info("resuming from %s at step %d", resume_dir, start_step)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    optimizer = make_optimizer(model, cfg)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps(), cfg.max_steps)
    if resume_dir is not None:
        optimizer.load_state_dict(torch.load(resume_dir / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(resume_dir / "scheduler.pt", weights_only=True))

    schedule = worker_schedule(len(blocks), cfg.seed, rank, world, cfg.batch_size, start_step)
    stream = None
    if cfg.fused:
        steps_left = cfg.max_steps - start_step
        order_source = worker_schedule(
            len(blocks), cfg.seed, rank, world, cfg.batch_size, start_step
        )
        order = (i for _, (_, _, idxs) in zip(range(steps_left), order_source) for i in idxs)
        target_fp = TokenizerView.from_hf(tokenizer).fingerprint
        stream = FusedTargetStream(
            cfg.aligner,
            blocks,
            order,
            depth=cfg.prefetch_depth,
            target_fingerprint=target_fp,
            k=cfg.k,
            teachers=cfg.teachers,
            preset=cfg.preset,
            options_json=json.dumps(cfg.fusion_options) if cfg.fusion_options else "",
            timeout_s=cfg.aligner_timeout_s,
        ).start()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    metrics_file = Path(cfg.metrics_file) if cfg.metrics_file and rank == 0 else None
    heldout = HeldOut.load(cfg) if rank == 0 else None
    if heldout is not None and start_step == 0:
        heldout.record(model, tokenizer, 0, 0, metrics_file)
    model.train()
    try:
        for step in range(start_step, cfg.max_steps):
            _, epoch, idxs = next(schedule)
            t0 = time.perf_counter()
            batch = [blocks[i] for i in idxs]
            wait_before = stream.stats.wait_s if stream else 0.0
            fused = [stream.get(b) for b in batch] if stream else None
            waited = (stream.stats.wait_s - wait_before) if stream else 0.0
            ids, mask, labels, f_ids, f_p, f_tail = batch_tensors(batch, fused, pad_id)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            if f_ids is not None:
                f_ids, f_p, f_tail = f_ids.to(device), f_p.to(device), f_tail.to(device)
            lam = cfg.lam_at(step) if stream else 1.0
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss, clm, fusion = combined_loss(
                logits, labels, f_ids, f_p, lam, cfg.fusion_loss, cfg.temperature, f_tail
            )
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            done = step + 1
            tokens = int(mask.sum()) * world
            metrics = {
                "step": done,
                "epoch": epoch,
                "loss": loss.item(),
                "clm_loss": clm.item(),
                "fusion_loss": fusion.item(),
                "lam": lam,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / elapsed,
                "step_s": elapsed,
                "wait_fraction": waited / elapsed if elapsed else 0.0,
                "cache_hit_rate": (
                    stream.stats.cache_hits / max(stream.stats.received, 1) if stream else 0.0
                ),
                "blocks_seen": done * cfg.batch_size * world,
            }
            if metrics_file is not None:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if heldout is not None and heldout.due(done, cfg):
                heldout.record(model, tokenizer, done, metrics["blocks_seen"], metrics_file)
                model.train()
            save = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
            if save:
                parts = (model, tokenizer, optimizer, scheduler)
                _report_checkpoint(cfg, parts, metrics, rank, fingerprint)
            elif done % cfg.log_every == 0:
                ray.train.report(metrics)
            if rank == 0 and (done % cfg.log_every == 0 or save):
                log.info(
                    "step %d/%d loss %.4f (clm %.4f, fusion %.4f) %.0f tok/s wait %.0f%%",
                    done,
                    cfg.max_steps,
                    metrics["loss"],
                    metrics["clm_loss"],
                    metrics["fusion_loss"],
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


def _report_checkpoint(cfg, parts, metrics, rank, fingerprint):
    import ray.train

    model, tokenizer, optimizer, scheduler = parts
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            out = Path(tmp)
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
            torch.save(optimizer.state_dict(), out / "optimizer.pt")
            torch.save(scheduler.state_dict(), out / "scheduler.pt")
            state = {
                "step": metrics["step"],
                "epoch": metrics["epoch"],
                "blocks_seen": metrics["blocks_seen"],
                "data_fingerprint": fingerprint,
                "config": cfg.model_dump(mode="json"),
            }
            (out / STATE_FILE).write_text(json.dumps(state, indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
