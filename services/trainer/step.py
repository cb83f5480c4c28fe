"""One optimizer step's work on one worker: batch tensors, forward/backward, the optimizer.

Covers turning a micro-batch of blocks (and their fused rows) into tensors, the forward and
backward of every micro-batch of a step with the step's token counts as loss denominators (so
gradient accumulation equals one big batch), gradient sync only on the last micro-batch, bf16
autocast, and AdamW with weight decay on matrices only.

Shapes: a micro-batch is input_ids / attention_mask / labels [B, L] and fused ids / probs
[B, L, W], tail [B, L] (B = blocks in the micro-batch, L = longest block, W = widest fused row).

Leaves out: the losses themselves (``loss``), where blocks and fused rows come from (``data``,
``prefetch``), the order of steps, checkpoints and metrics (``recipe``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import torch

from fuseserve.batching import pad_ids, pad_rows
from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.data import Block
from fuseserve.trainer.loss import combined_loss, loss_counts

MicroBatch = tuple[
    torch.Tensor,  # input_ids
    torch.Tensor,  # attention_mask
    torch.Tensor,  # labels
    torch.Tensor | None,  # fused ids (None without fused blocks)
    torch.Tensor | None,  # fused probs
    torch.Tensor | None,  # fused tail
]  # the six tensors of ``batch_tensors``


# a step's own loss: (logits, micro-batch on the device, the step's (label, target) counts) ->
# (loss to backpropagate, two more terms to report), each term a sum over the micro-batch
# divided by the step's counts, so micro-batches add up
LossFn = Callable[
    [torch.Tensor, MicroBatch, tuple[int, int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


class _NoSync(Protocol):
    """A wrapped model with DDP's ``no_sync`` context."""

    def no_sync(self) -> contextlib.AbstractContextManager[None]: ...


class _GradientSyncSwitch(Protocol):
    """A wrapped model with FSDP2's gradient-sync switch."""

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None: ...


def label_row(block: Block) -> np.ndarray:
    """The block's labels [n]: its ids, −100 outside ``loss_mask`` (chat) when it has one."""
    labels = block.ids.astype(np.int64)
    if block.loss_mask is not None:
        labels = np.where(block.loss_mask, labels, -100)
    return labels


def fused_id_row(block: Block, fused) -> np.ndarray:
    """The fused ids [n, w] of a block; with a ``loss_mask`` a row i keeps its ids only where
    token i + 1 is a masked (assistant) token, else −1 (no target)."""
    n = len(block.ids)
    ids = fused.ids[:n].astype(np.int64)
    if block.loss_mask is not None:
        keep = np.zeros(n, dtype=bool)
        keep[: n - 1] = block.loss_mask[1:]
        ids = np.where(keep[:, None], ids, -1)
    return ids


def batch_tensors(blocks: list[Block], fused: list | None, pad_id: int) -> MicroBatch:
    """input_ids, attention_mask, labels [B, L]; fused ids/probs [B, L, W] and tail [B, L]
    (None without fused blocks). A block with a ``loss_mask`` (chat) keeps labels only on its
    masked (assistant) tokens, and a fused row i only where token i + 1 is one of them."""
    ids, mask = pad_ids([b.ids for b in blocks], pad_id)
    labels = pad_rows([label_row(b) for b in blocks], -100)
    if fused is None:
        return ids, mask, labels, None, None, None
    length = ids.shape[1]
    f_ids = pad_rows([fused_id_row(b, f) for b, f in zip(blocks, fused)], -1, length=length)
    cut = [(f, len(b.ids)) for b, f in zip(blocks, fused)]
    f_p = pad_rows([f.probs[:n] for f, n in cut], 0.0, torch.float32, length)
    f_tail = pad_rows([f.tail[:n] for f, n in cut], 0.0, torch.float32, length)
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


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Let backward synchronise gradients across workers only when ``enabled`` (the last
    micro-batch of a step): DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``."""
    # the casts: nn.Module's __getattr__ hides what the hasattr checks find from the checker
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with cast(_NoSync, model).no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        switch = cast(_GradientSyncSwitch, model)
        switch.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            switch.set_requires_gradient_sync(True)
    else:
        yield


def autocast_context(cfg: TrainConfig, device: torch.device):
    """bf16 autocast of the forward (weights stay fp32) when ``mixed_precision`` is bf16."""
    if cfg.mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_denominators(micro_batches: list[MicroBatch], lam: float) -> tuple[int, int]:
    """(label count, fused-target count) of a whole step: the loss terms' denominators."""
    n_label = n_target = 0
    for _, _, labels, f_ids, _, _ in micro_batches:
        a, b = loss_counts(labels, f_ids if lam < 1.0 else None)
        n_label, n_target = n_label + a, n_target + b
    return n_label, n_target


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[MicroBatch],
    lam: float,
    cfg: TrainConfig,
    device: torch.device,
    loss_fn: LossFn | None = None,
) -> StepLosses:
    """Forward and backward of every micro-batch of one step, gradients left in ``.grad``.

    Each micro-batch's CLM and fusion terms are sums divided by the label and target counts of
    the whole step, so the gradients (and losses) equal those of one batch of all the blocks.
    ``loss_fn`` replaces λ·CLM + (1−λ)·fusion (on-policy steps); its terms are reported as
    ``clm`` and ``fusion``.
    """
    denominators = step_denominators(micro_batches, lam if loss_fn is None else 0.0)
    sums = torch.zeros(3, dtype=torch.float64)
    tokens = 0
    for i, batch in enumerate(micro_batches):
        on_device = _on_device(batch, device)
        ids, mask, labels, f_ids, f_p, f_tail = on_device
        with gradient_sync(model, i == len(micro_batches) - 1):
            with autocast_context(cfg, device):
                logits = model(input_ids=ids, attention_mask=mask).logits
            if loss_fn is not None:
                loss, clm, fusion = loss_fn(logits, on_device, denominators)
            else:
                loss, clm, fusion = combined_loss(
                    logits,
                    labels,
                    f_ids,
                    f_p,
                    lam,
                    cfg.fusion_loss,
                    cfg.temperature,
                    f_tail,
                    denominators=denominators,
                    chunk=cfg.loss_chunk or None,
                )
            loss.backward()
        sums += torch.stack([loss.detach(), clm, fusion]).double().cpu()
        tokens += int(mask.sum())
    loss_sum, clm_sum, fusion_sum = sums.tolist()
    return StepLosses(loss_sum, clm_sum, fusion_sum, tokens=tokens)


def _on_device(batch: MicroBatch, device: torch.device) -> MicroBatch:
    """The micro-batch's tensors moved to ``device`` (absent fused tensors stay None)."""
    ids, mask, labels, f_ids, f_p, f_tail = batch

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return ids.to(device), mask.to(device), labels.to(device), move(f_ids), move(f_p), move(f_tail)
