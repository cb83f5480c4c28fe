"""Fused targets in ``transformers.Trainer``: a collator, a ``Trainer`` subclass, the block order.

Covers:

- ``BlockExamples(blocks, order)``: a torch dataset of training blocks in a given order, item i =
  ``{"block": index, "input_ids": [n], "loss_mask": [n] or None}``; ``training_order`` gives the
  order ``fuseserve train`` (one worker) takes them in: a permutation per epoch from the seed,
  ``blocks_per_step`` blocks per step.
- ``FusedTargetsCollator``: examples -> the tensors ``fuseserve train`` builds for a micro-batch
  (``trainer.step.batch_tensors``): ``input_ids``, ``attention_mask``, ``labels`` [B, L] and
  ``fused_ids`` [B, L, W] (−1 pad), ``fused_probs`` [B, L, W], ``fused_tail`` [B, L]. The fused
  rows come from a source with ``get(block)``: a fused store (``from_store``, random access, any
  order), the aligner (``from_aligner``: the trainer's background ``FuseStream`` prefetch, which
  asks for the blocks in the order given, so the Trainer must consume them in that order:
  ``train_sampling_strategy="sequential"``, ``dataloader_num_workers=0``), or none, when the
  examples carry the store's columns themselves (rows of ``fuseserve.store.dataset``).
- ``FusionTrainer``: ``compute_loss`` is ``fuseserve.trainer.loss.combined_loss``, the function
  ``fuseserve train`` calls (λ·CLM + (1−λ)·fusion, soft cross-entropy or KL, tail term, chunks),
  λ constant or linear to ``lam_end``; weight decay on matrices only (as ``fuseserve train``);
  each training step's (loss, clm, fusion) in ``fusion_history`` and its means in the logs.

Under Hugging Face gradient accumulation each micro-batch's loss is its own mean (divided by the
number of micro-batches, Hugging Face's convention), where ``fuseserve train`` divides by the
counts of the whole step: the two agree when micro-batches hold equal counts.

Leaves out: building blocks (``trainer.data``), writing stores (``store``), the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from fuseserve.trainer.data import Block, worker_schedule
from fuseserve.trainer.loss import combined_loss
from fuseserve.trainer.loss_kind import FusionLoss
from fuseserve.trainer.step import batch_tensors, step_denominators
from fuseserve.wire.messages import FusedBlock


def training_order(num_blocks: int, seed: int, blocks_per_step: int, steps: int) -> list[int]:
    """Block indices in the order ``fuseserve train`` with one worker takes them for ``steps``
    steps of ``blocks_per_step`` blocks (batch_size x grad_accum)."""
    schedule = worker_schedule(num_blocks, seed, 0, 1, blocks_per_step)
    return [i for _, (_, _, idxs) in zip(range(steps), schedule) for i in idxs]


class BlockExamples(torch.utils.data.Dataset):
    """Training blocks as Trainer examples, item i = block ``order[i]``."""

    def __init__(self, blocks: Sequence[Block], order: Sequence[int]) -> None:
        self.blocks, self.order = blocks, list(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, Any]:
        block = self.blocks[self.order[i]]
        mask = None if block.loss_mask is None else block.loss_mask.tolist()
        return {"block": block.index, "input_ids": block.ids.tolist(), "loss_mask": mask}


def example_block(example: dict[str, Any]) -> Block:
    """The ``Block`` (index, ids [n], loss mask) of an example (its text is not needed here)."""
    mask = example.get("loss_mask")
    return Block(
        int(example["block"]),
        "",
        np.asarray(example["input_ids"], dtype=np.int64),
        None if mask is None else np.asarray(mask, dtype=bool),
    )


def example_fused(example: dict[str, Any]) -> FusedBlock:
    """The fused rows a store row carries (``fused_ids``/``fused_probs`` [n][w_i],
    ``fused_tail`` [n], ``width``) as a ``FusedBlock`` [n, width]."""
    rows = example["fused_ids"]
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    width = int(example.get("width") or lengths.max(initial=0))
    slot = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full((len(rows), width), -1, dtype=np.int32)
    probs = np.zeros((len(rows), width), dtype=np.float32)
    if lengths.sum():
        ids[slot] = np.concatenate([np.asarray(r) for r in rows])
        flat = np.concatenate([np.asarray(p, dtype=np.float16) for p in example["fused_probs"]])
        probs[slot] = flat.astype(np.float32)
    n = len(rows)
    return FusedBlock(
        target_ids=np.asarray(example["input_ids"], dtype=np.int32),
        ids=ids,
        probs=probs,
        tail=np.asarray(example["fused_tail"], dtype=np.float16).astype(np.float32),
        chosen=np.full(n, -1, dtype=np.int16),
        ce=np.zeros(0, dtype=np.float32),
        coverage=np.zeros(0, dtype=np.float32),
    )


class FusedTargetsCollator:
    """Examples -> a micro-batch with sparse fused targets; see the module docstring."""

    def __init__(self, source=None, pad_id: int = 0, sequential: bool = False) -> None:
        self.source, self.pad_id, self.sequential = source, pad_id, sequential

    @classmethod
    def from_store(cls, folder: str, pad_id: int = 0) -> FusedTargetsCollator:
        """Fused rows read from a store written by ``fuseserve export``."""
        from fuseserve.store.reader import FusedStore

        return cls(FusedStore(folder), pad_id)

    @classmethod
    def from_aligner(
        cls, address: str, blocks: Sequence[Block], order: Sequence[int], pad_id: int = 0, **kw
    ) -> FusedTargetsCollator:
        """Fused rows streamed from the aligner ahead of use (``kw``: ``FusedTargetStream``'s
        depth, target_fingerprint, k, teachers, preset, options_json, timeout_s ...), in
        ``order``: the order the Trainer will ask for them."""
        from fuseserve.trainer.prefetch import FusedTargetStream

        stream = FusedTargetStream(address, blocks, iter(list(order)), **kw).start()
        return cls(stream, pad_id, sequential=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
        blocks = [example_block(e) for e in examples]
        if self.source is None:
            fused = [example_fused(e) for e in examples]
        else:
            fused = [self.source.get(b) for b in blocks]
        ids, mask, labels, f_ids, f_p, f_tail = batch_tensors(blocks, fused, self.pad_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "fused_ids": f_ids,
            "fused_probs": f_p,
            "fused_tail": f_tail,
        }

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


class FusionTrainer(Trainer):
    """``transformers.Trainer`` on λ·CLM + (1−λ)·fusion; see the module docstring.

    lam: weight of the CLM term (λ) at the first step; lam_end: λ at the last step (linear;
    None = constant); fusion_loss: "soft_ce" or "kl"; temperature: of the target's softmax;
    loss_chunk: positions per slice of the loss (None = all at once)."""

    def __init__(
        self,
        *args,
        lam: float = 0.9,
        lam_end: float | None = None,
        fusion_loss: str = "soft_ce",
        temperature: float = 1.0,
        loss_chunk: int | None = 1024,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lam, self.lam_end = lam, lam_end
        self.fusion_kind, self.temperature = FusionLoss(fusion_loss), temperature
        self.loss_chunk = loss_chunk
        self.loss_is_scaled_for_ga = False  # compute_loss returns a micro-batch mean
        self.fusion_history: list[dict[str, float]] = []
        self._unlogged: list[dict[str, float]] = []
        check_arguments(self.args, self.data_collator)

    def lam_at(self, step: int) -> float:
        """λ for a 0-based step (linear from ``lam`` to ``lam_end`` over ``max_steps``)."""
        last = self.state.max_steps - 1
        if self.lam_end is None or last <= 0:
            return self.lam
        return self.lam + (self.lam_end - self.lam) * min(step / last, 1.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        labels, f_ids = inputs["labels"], inputs.get("fused_ids")
        f_p, f_tail = inputs.get("fused_probs"), inputs.get("fused_tail")
        lam = self.lam_at(self.state.global_step) if f_ids is not None else 1.0
        batch = (inputs["input_ids"], inputs["attention_mask"], labels, f_ids, f_p, f_tail)
        loss, clm, fusion = combined_loss(
            outputs.logits,
            labels,
            f_ids,
            f_p,
            lam,
            self.fusion_kind,
            self.temperature,
            f_tail,
            denominators=step_denominators([batch], lam),
            chunk=self.loss_chunk,
        )
        if model.training:
            parts = {"loss": loss.item(), "clm_loss": clm.item(), "fusion_loss": fusion.item()}
            self.fusion_history.append({"step": self.state.global_step + 1, **parts})
            self._unlogged.append(parts)
        return (loss, outputs) if return_outputs else loss

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """Weight decay on matrices only (norms and biases excluded), as ``fuseserve train``."""
        return [name for name, p in model.named_parameters() if p.ndim >= 2]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Hugging Face's log line plus the mean CLM and fusion terms since the last one."""
        if "loss" in logs and self._unlogged:
            for key in ("clm_loss", "fusion_loss"):
                logs[key] = sum(p[key] for p in self._unlogged) / len(self._unlogged)
            self._unlogged = []
        super().log(logs, start_time)


def check_arguments(args, collator) -> None:
    """Refuse TrainingArguments under which the collator cannot work (naming the argument)."""
    if args.remove_unused_columns:
        raise ValueError(
            "remove_unused_columns: set it to False (the collator needs the examples' "
            "'block' and fused columns, which the model's forward does not take)"
        )
    if getattr(collator, "sequential", False):
        if args.train_sampling_strategy != "sequential":
            raise ValueError(
                "train_sampling_strategy: must be 'sequential' with fused targets from the "
                "aligner (the stream asks for blocks in the order the dataset lists them)"
            )
        if args.dataloader_num_workers:
            raise ValueError(
                "dataloader_num_workers: must be 0 with fused targets from the aligner (the "
                "stream's own thread prefetches)"
            )
