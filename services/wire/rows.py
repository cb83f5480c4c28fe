"""Cutting a fused block down to what a caller asked for: a position range and the top-n per row.

Covers ``select_rows(block, top, start, end)``: the rows ``[start, end)`` of a ``FusedBlock``
(clamped to the block, like a Python slice of non-negative bounds) and, per row, its ``top``
most probable entries in descending probability (ties keep their stored order; padding last).
The REST answer (JSON and binary) and the client's gRPC path call this one function, so every
transport returns identical arrays for identical options.

Leaves out: encoding (``messages``, ``fuse_reply``) and how the block was computed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fuseserve.wire.messages import FusedBlock


def row_range(n: int, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """``[start, end)`` clamped to ``[0, n]`` (``end`` None: to the end; never ``end < start``)."""
    lo = min(max(start, 0), n)
    hi = n if end is None else min(max(end, lo), n)
    return lo, hi


def top_order(ids: np.ndarray, probs: np.ndarray, top: int) -> np.ndarray:
    """Column order [rows, min(top, width)] of each row's ``top`` most probable entries.

    ids, probs: [rows, width]; padding (id -1) sorts after every listed entry, whatever its
    probability, so a zero-probability entry is never hidden behind padding."""
    key = np.where(ids >= 0, probs.astype(np.float64), -np.inf)
    return np.argsort(-key, axis=1, kind="stable")[:, : max(0, top)]


def select_rows(
    block: FusedBlock, top: int | None = None, start: int = 0, end: int | None = None
) -> FusedBlock:
    """Rows ``[start, end)`` of ``block`` with their ``top`` best entries (None: all of them).

    The result has target_ids, chosen, tail [end - start] and ids, probs [end - start, width']
    with width' = min(top, width); ce, coverage and teachers are the whole block's. Row i of the
    result is row ``start + i`` of the block (it predicts target token ``start + i + 1``)."""
    lo, hi = row_range(len(block.target_ids), start, end)
    ids, probs = block.ids[lo:hi], block.probs[lo:hi]
    width = ids.shape[1] if top is None else min(top, ids.shape[1])
    order = top_order(ids, probs, width)
    return dataclasses.replace(
        block,
        target_ids=block.target_ids[lo:hi],
        ids=np.take_along_axis(ids, order, axis=1),
        probs=np.take_along_axis(probs, order, axis=1),
        chosen=block.chosen[lo:hi],
        tail=block.tail_mass[lo:hi],
    )


def compact(block: FusedBlock) -> FusedBlock:
    """``block`` without the columns that are padding in every row, padding's probability 0:
    the one form in which blocks that crossed different transports compare equal."""
    listed = block.ids >= 0
    width = int(listed.sum(axis=1).max(initial=0))
    if listed[:, width:].any():  # padding is not only at row ends: keep every column
        width = block.ids.shape[1]
    return dataclasses.replace(
        block,
        ids=block.ids[:, :width],
        probs=np.where(listed, block.probs, 0).astype(block.probs.dtype)[:, :width],
    )
