"""The training recipe of one worker: setup, step, checkpoint, evaluate, run.

Covers ``FusionRecipe``, one worker's whole run in named parts: ``setup`` builds the blocks
(deterministic, identical on every worker), picks the checkpoint to resume (Ray's own or the
newest complete one on storage, whichever is further), loads the target model the way
``fuseserve eval`` does (``fuseserve.loading``: a directory, a .gguf file, ``shipped:smollm2``,
a hub id), wraps it (``ddp``: Ray's ``prepare_model``; ``fsdp``: torch FSDP2 ``fully_shard``
per decoder layer and at the root) and opens the fused-target stream for exactly this worker's
upcoming blocks; ``train_step`` takes this worker's slice of one global batch (``batch_size ×
grad_accum`` blocks in ``grad_accum`` micro-batches) and steps AdamW with clipping and a cosine
schedule; ``save_checkpoint`` / ``load_checkpoint`` write and read model, optimizer, scheduler,
RNG and data position; ``evaluate`` records held-out BPB; ``run`` loops steps, reporting metrics
every ``log_every`` and a checkpoint every ``checkpoint_every`` steps.

The Ray side (rank, device, Ray's checkpoint, ``report``, the barrier) sits behind ``RayWorker``,
so the recipe runs as well in one process with a stand-in worker. ``train_loop`` is the function
``TorchTrainer`` runs on each worker: it builds the recipe and calls ``run``.

Shapes: see ``step`` (micro-batches [B, L] and fused [B, L, W]).

Leaves out: assembling the TorchTrainer (``job``), losses (``loss``), data (``data``), one step's
tensors and gradients (``step``), checkpoint files (``checkpoint``), fused targets (``prefetch``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from fuseserve.trainer.checkpoint import (
    check_resumable,
    checkpoint_complete,
    find_latest_checkpoint,
    furthest,
    load_training_state,
    mark_complete,
    write_checkpoint,
)
from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.data import build_blocks, data_fingerprint, worker_schedule
from fuseserve.trainer.heldout import HeldOut
from fuseserve.trainer.metrics_log import append_row, trim_after
from fuseserve.trainer.step import accumulate_gradients, batch_tensors, make_optimizer

log = logging.getLogger(__name__)


class RayWorker:
    """This worker's place in the Ray Train job: rank, world size, device, the checkpoint Ray
    registered, wrapping for DDP, reports (with a checkpoint folder) and a barrier."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def registered_checkpoint(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else Path(checkpoint.to_directory())

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, folder: Path | None = None, dir_name: str = "") -> None:
        import ray.train

        if folder is None:
            ray.train.report(metrics)
            return
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)

    def barrier(self) -> None:
        torch.distributed.barrier()


class _GradientCheckpointing(Protocol):
    """A Hugging Face model's activation-checkpointing switch (the older name)."""

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None: ...


class _ActivationCheckpointing(Protocol):
    """The same switch under its newer name (transformers deprecates the older one)."""

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None: ...


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, worker) -> torch.nn.Module:
    """Activation checkpointing, then DDP (the worker's ``prepare_model``) or FSDP2 sharding."""
    if cfg.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"activation_checkpointing: {type(model).__name__} does not support it"
            )
        # cast: nn.Module's __getattr__ hides the method the check above found from the checker
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            cast(_ActivationCheckpointing, model).activation_checkpointing_enable(kwargs)
        else:
            cast(_GradientCheckpointing, model).gradient_checkpointing_enable(kwargs)
    if cfg.parallel == "ddp":
        return worker.prepare_model(model)
    from torch.distributed.fsdp import fully_shard

    model.to(worker.device)
    layer_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module)  # one all-gather per decoder layer
    fully_shard(model)  # embeddings, final norm, lm_head
    return model


class FusionRecipe:
    """One worker's training run on λ·CLM + (1−λ)·fusion; see the module docstring."""

    def __init__(self, cfg: TrainConfig, worker) -> None:
        self.cfg = cfg
        self.worker = worker
        self.rank, self.world = worker.rank, worker.world
        self.stream = None
        self.start_step = 0
        self.epoch = 0

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Blocks, resume point, model, optimizer, schedule, fused stream, held-out data."""
        from fuseserve.loading import load_tokenizer

        cfg = self.cfg
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        self.blocks = build_blocks(cfg, self.tokenizer)
        self.fingerprint = data_fingerprint(self.blocks)
        self.onpolicy = None
        if cfg.on_policy > 0:
            from fuseserve.trainer.onpolicy import OnPolicy

            self.onpolicy = OnPolicy(cfg, self.tokenizer, self.blocks, self.rank, self.world)
        resume_dir = self.resume_dir()
        if resume_dir is not None:
            self.start_step = check_resumable(resume_dir, cfg, self.fingerprint)
            if self.rank == 0:
                log.info("resuming from %s at step %d", resume_dir, self.start_step)
        self.setup_model(resume_dir)
        if resume_dir is not None:
            self.load_checkpoint(resume_dir)
        self.schedule = self.worker_steps()
        self.stream = self.open_stream()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.metrics_file = Path(cfg.metrics_file) if cfg.metrics_file and self.rank == 0 else None
        if self.metrics_file is not None:
            dropped = trim_after(self.metrics_file, self.start_step)
            if dropped:
                log.info("metrics file: %d rows after step %d dropped", dropped, self.start_step)
        self.last_checkpoint = time.monotonic()
        # a sharded model answers only when every rank runs it: all ranks evaluate under fsdp
        evaluates = self.rank == 0 or cfg.parallel == "fsdp"
        self.heldout = HeldOut.load(cfg) if evaluates else None

    def resume_dir(self) -> Path | None:
        """Ray's own checkpoint (worker failure inside this run) or, for a run started again
        under the same name, the newest complete checkpoint on storage: whichever is further
        along (a run killed while uploading may have a newer one than Ray registered)."""
        candidates = [find_latest_checkpoint(self.cfg.storage_path, self.cfg.name)]
        registered = self.worker.registered_checkpoint()
        if registered is not None and checkpoint_complete(registered, True):
            candidates.append(registered)
        return furthest(candidates)

    def setup_model(self, resume_dir: Path | None) -> None:
        """The target model (ddp resumes from the checkpoint's Hugging Face model; fsdp loads the
        starting weights, then its shards in ``load_checkpoint``), optimizer and scheduler."""
        from transformers import get_cosine_schedule_with_warmup

        from fuseserve.loading import load_causal_lm

        cfg = self.cfg
        if resume_dir is not None and cfg.parallel == "ddp":
            source = str(resume_dir / "model")
        else:
            source = cfg.model
        self.model = wrap_model(load_causal_lm(source, cfg.dtype), cfg, self.worker)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, cfg.warmup_steps(), cfg.max_steps
        )

    def worker_steps(self):
        """(data step, epoch, block indices) of this worker's off-policy steps from
        ``start_step`` on (on-policy steps take no blocks: the data position is the number of
        off-policy steps before)."""
        cfg = self.cfg
        n, per_step = len(self.blocks), cfg.blocks_per_step
        data_start = self.start_step - cfg.onpolicy_before(self.start_step)
        return worker_schedule(n, cfg.seed, self.rank, self.world, per_step, data_start)

    def stream_order(self):
        """What the fused-target stream asks for, step by step: a fed sample per block of an
        on-policy step, the step's blocks for an off-policy step that fuses."""
        from fuseserve.trainer.prefetch import FED

        cfg, data = self.cfg, self.worker_steps()
        for step in range(self.start_step, cfg.max_steps):
            if cfg.is_onpolicy(step):
                yield from [FED] * cfg.blocks_per_step
                continue
            _, _, idxs = next(data)
            if cfg.fuses_offpolicy:
                yield from idxs

    def open_stream(self):
        """The started fused-target stream for this worker's remaining blocks (None: CLM only)."""
        cfg = self.cfg
        if cfg.fused and cfg.fused_from:
            return self.open_store()
        if not cfg.fused or cfg.aligner is None:  # fused implies an aligner or a store
            return None
        from fuseserve.trainer.prefetch import FusedTargetStream
        from fuseserve.wire.tokenizer import TokenizerIdentity

        order = self.stream_order()
        return FusedTargetStream(
            cfg.aligner,
            self.blocks,
            order,
            depth=cfg.fused_prefetch_depth(),
            target_fingerprint=TokenizerIdentity.from_hf(self.tokenizer).fingerprint,
            k=cfg.k,
            teachers=cfg.teachers,
            preset=cfg.preset,
            options_json=json.dumps(cfg.fusion_options) if cfg.fusion_options else "",
            timeout_s=cfg.aligner_timeout_s,
            outage_window_s=cfg.aligner_outage_s,
        ).start()

    def open_store(self):
        """The fused store of ``fused_from`` (no aligner), refused unless it holds this run's
        blocks, target tokenizer and fusion choices (``fuseserve.store``)."""
        from fuseserve.store.reader import FusedStore
        from fuseserve.wire.tokenizer import TokenizerIdentity

        store = FusedStore(self.cfg.fused_from or "")
        fingerprint = TokenizerIdentity.from_hf(self.tokenizer).fingerprint
        store.check_run(self.cfg, fingerprint, self.blocks)
        return store

    # ------------------------------------------------------------------------------ step
    def micro_batches(self, idxs) -> list:
        """The step's blocks in micro-batches of ``batch_size``, fused rows pulled in order."""
        out = []
        stream = self.stream if self.cfg.fuses_offpolicy else None
        for m in range(0, self.cfg.blocks_per_step, self.cfg.batch_size):
            batch = [self.blocks[i] for i in idxs[m : m + self.cfg.batch_size]]
            fused = [stream.get(b) for b in batch] if stream else None
            out.append(batch_tensors(batch, fused, self.pad_id))
        return out

    def train_step(self, step: int) -> dict:
        """One optimizer step (0-based ``step``) on this worker's slice; its metrics row."""
        cfg, stream = self.cfg, self.stream
        t0 = time.perf_counter()
        wait_before = stream.stats.wait_s if stream else 0.0
        rollout, loss_fn = None, None
        if self.onpolicy is not None and cfg.is_onpolicy(step):
            rollout = self.onpolicy.rollout(self.model, step, stream, self.worker.device)
            micro_batches, loss_fn, lam = rollout.micro_batches, self.onpolicy.loss_fn(), 0.0
        else:
            _, self.epoch, idxs = next(self.schedule)
            micro_batches = self.micro_batches(idxs)
            lam = cfg.lam_at(step) if cfg.fuses_offpolicy else 1.0
        waited = (stream.stats.wait_s - wait_before) if stream else 0.0
        device = self.worker.device
        losses = accumulate_gradients(self.model, micro_batches, lam, cfg, device, loss_fn)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        metrics = self.step_metrics(step, losses, lam, elapsed, waited)
        if self.onpolicy is not None:
            metrics.update(onpolicy_metrics(cfg, step, rollout, losses, elapsed))
        return metrics

    def step_metrics(self, step: int, losses, lam: float, elapsed: float, waited: float) -> dict:
        """The metrics row every step has."""
        cfg, stream = self.cfg, self.stream
        tokens = losses.tokens * self.world  # this worker's count times the workers
        metrics = {
            "step": step + 1,
            "epoch": self.epoch,
            "loss": losses.loss,
            "clm_loss": losses.clm,
            "fusion_loss": losses.fusion,
            "lam": lam,
            "lr": self.scheduler.get_last_lr()[0],
            "global_batch_tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "step_s": elapsed,
            "wait_fraction": waited / elapsed if elapsed else 0.0,
            "waiting_for_targets_seconds": waited,
            "cache_hit_rate": (
                stream.stats.cache_hits / max(stream.stats.received, 1) if stream else 0.0
            ),
            "blocks_seen": (step + 1) * cfg.blocks_per_step * self.world,
        }
        if self.worker.device.type == "cuda":
            metrics["peak_memory_mib"] = torch.cuda.max_memory_allocated(self.worker.device) / 2**20
        return metrics

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, metrics: dict) -> None:
        """Every rank writes its part of the checkpoint and reports it to Ray with ``metrics``;
        after a barrier rank 0 marks it complete."""
        cfg = self.cfg
        state = {
            "step": metrics["step"],
            "epoch": metrics["epoch"],
            "blocks_seen": metrics["blocks_seen"],
            "data_fingerprint": self.fingerprint,
            "parallel": cfg.parallel,
            "world": self.world,
            "config": cfg.model_dump(mode="json"),
            "onpolicy_steps": cfg.onpolicy_before(metrics["step"]),
        }
        parts = (self.model, self.tokenizer, self.optimizer, self.scheduler)
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), cfg, parts, state, self.rank)
            # the name is rank 0's (Ray broadcasts it); a timestamp keeps a resumed run from
            # writing into a folder a killed run left half-written
            dir_name = f"checkpoint_step{metrics['step']:07d}_{time.time_ns()}"
            self.worker.report(metrics, Path(tmp), dir_name)
        self.worker.barrier()  # every rank's upload has returned
        if self.rank == 0:
            mark_complete(cfg, dir_name, metrics["step"])
        self.last_checkpoint = time.monotonic()

    def checkpoint_due_by_time(self) -> bool:
        """Whether ``checkpoint_every_s`` has passed since the last checkpoint (or the start):
        rank 0's clock decides for every rank, so all of them save together."""
        every = self.cfg.checkpoint_every_s
        if not every:
            return False
        due = time.monotonic() - self.last_checkpoint >= every
        if self.world > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([int(due)], device=self.worker.device)
            torch.distributed.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def load_checkpoint(self, folder: Path) -> None:
        """Optimizer (fsdp: model shards too), scheduler and this rank's RNG from ``folder``."""
        parts = (self.model, self.optimizer, self.scheduler)
        load_training_state(folder, self.cfg, parts, self.rank)

    # ------------------------------------------------------------------------------ evaluate
    def evaluate(self, step: int, blocks_seen: int) -> dict | None:
        """Held-out BPB after ``step`` steps (None without ``eval_data`` on this rank)."""
        if self.heldout is None:
            return None
        row = self.heldout.record(self.model, self.tokenizer, step, blocks_seen, self.metrics_file)
        self.model.train()
        return row

    # ------------------------------------------------------------------------------ run
    def run(self) -> None:
        """Setup, held-out BPB at step 0 of a fresh run, then every remaining step."""
        self.setup()
        try:
            if self.start_step == 0:
                self.evaluate(0, 0)
            self.model.train()
            self.log_global_batch()
            for step in range(self.start_step, self.cfg.max_steps):
                self.finish_step(self.train_step(step))
        finally:
            if self.stream is not None:
                self.stream.close()

    def finish_step(self, metrics: dict) -> None:
        """Metrics file, held-out BPB when due, checkpoint or report, log line."""
        cfg, done = self.cfg, metrics["step"]
        append_row(self.metrics_file, metrics)
        if HeldOut.due(done, cfg):
            self.evaluate(done, metrics["blocks_seen"])
        save = done % cfg.checkpoint_every == 0 or done == cfg.max_steps
        save = self.checkpoint_due_by_time() or save
        if save:
            self.save_checkpoint(metrics)
        elif done % cfg.log_every == 0:
            self.worker.report(metrics)
        if self.rank == 0 and (done % cfg.log_every == 0 or save):
            log.info(
                "step %d/%d loss %.4f (clm %.4f, fusion %.4f) global batch %d tokens, "
                "%.0f tok/s wait %.0f%%",
                done,
                cfg.max_steps,
                metrics["loss"],
                metrics["clm_loss"],
                metrics["fusion_loss"],
                metrics["global_batch_tokens"],
                metrics["tokens_per_s"],
                100 * metrics["wait_fraction"],
            )

    def log_global_batch(self) -> None:
        if self.rank == 0:
            cfg, per_step = self.cfg, self.cfg.blocks_per_step
            log.info(
                "global batch: %d blocks = %d x %d micro-batches x %d workers (<= %d tokens)",
                per_step * self.world,
                cfg.batch_size,
                cfg.grad_accum,
                self.world,
                per_step * self.world * cfg.block_size,
            )


def train_loop(config: dict) -> None:
    """The per-worker function of ``TorchTrainer``: the recipe on this Ray worker."""
    FusionRecipe(TrainConfig(**config), RayWorker()).run()


def onpolicy_metrics(cfg: TrainConfig, step: int, rollout, losses, elapsed: float) -> dict:
    """A run with on-policy steps: whether this one was, the share so far and (on-policy steps)
    completion length, generation share of the step, teacher-judged NLL and the divergence."""
    row = {
        "onpolicy": rollout is not None,
        "onpolicy_share": cfg.onpolicy_before(step + 1) / (step + 1),
    }
    if rollout is None:
        return {**row, "generation_fraction": 0.0}
    lengths = rollout.completion_lengths
    return {
        **row,
        "completion_len_mean": sum(lengths) / max(len(lengths), 1),
        "generation_fraction": rollout.generation_s / elapsed if elapsed else 0.0,
        "teacher_nll": losses.clm,
        "onpolicy_divergence": losses.fusion,
        "clm_loss": 0.0,
        "fusion_loss": 0.0,
    }
