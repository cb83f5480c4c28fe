"""Padding ragged rows into one batch tensor: the trainer, eval and the teacher backend share it.

Covers ``pad_rows`` (B arrays of shape [n_b, *rest_b] into one tensor [B, L, *rest] filled with
a value) and ``pad_ids`` (B token-id rows into input_ids and attention_mask, both [B, L]). Rows
are padded on the right: a row's values first, the fill after them, which is how every causal LM
call in fuseserve lays out its batch (positions and the attention mask start at 0 for each row).

Leaves out: what a fill means (labels −100, fused ids −1 are the callers' choice), truncation,
left padding (nothing here generates, so nothing needs it), moving tensors to a device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_rows(
    rows: Sequence,
    fill: float,
    dtype: torch.dtype = torch.long,
    length: int | None = None,
) -> torch.Tensor:
    """Right-pad B rows into one tensor.

    rows: B array-likes (numpy arrays, lists, tensors) of shape [n_b, *rest_b], all of the same
    number of dimensions; returns [B, L, *rest] of ``dtype`` where L = ``length`` (default: the
    longest n_b) and each trailing size is the largest of the rows'. Row b's values sit at
    [b, :n_b, :rest_b...]; everything else is ``fill``. Example: rows [5, 6] and [7], fill 0
    -> [[5, 6], [7, 0]].
    """
    if not rows:
        raise ValueError("rows: need at least one row to pad")
    arrays = [np.asarray(r) for r in rows]
    ndims = {a.ndim for a in arrays}
    if len(ndims) != 1 or 0 in ndims:
        raise ValueError(f"rows: every row needs the same number (>= 1) of dims, got {ndims}")
    shape = [max(s) for s in zip(*(a.shape for a in arrays))]
    if length is not None:
        if length < shape[0]:
            raise ValueError(f"length: {length} is shorter than the longest row ({shape[0]})")
        shape[0] = length
    out = torch.full((len(arrays), *shape), fill, dtype=dtype)
    for b, a in enumerate(arrays):
        index: tuple[int | slice, ...] = (b, *(slice(0, s) for s in a.shape))
        out[index] = torch.as_tensor(a).to(dtype)
    return out


def pad_ids(rows: Sequence, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, L] int64 with ``pad_id`` after each row, attention_mask [B, L] int64: 1 on
    a row's own tokens, 0 on padding) for B token-id rows of lengths n_b, L = max n_b."""
    ids = pad_rows(rows, pad_id)
    mask = pad_rows([np.ones(len(r), dtype=np.int64) for r in rows], 0)
    return ids, mask
