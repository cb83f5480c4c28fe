"""Projection of one teacher's top-k distributions onto the target vocabulary.

Covers: at each target position paired with a teacher position, the teacher's top-k
(ids, log-probs) become a sparse distribution over target ids: ids go through the vocabulary map
(entries without a target id are dropped), probabilities are ``softmax(logprob / T)`` over what
is kept, and target ids reached by several teacher tokens either add their mass (``sum``, default)
or keep only the first, highest-ranked entry (``first``, the original code). Positions without a
pair (or whose kept set is empty) get a one-hot of their fallback token, or are left empty when
the fallback is ``missing``. Positions without a label (fallback -1: the last position under
the ``next`` anchor) stay empty.

``SparseDist`` holds ids [n, width] int32 (-1 = padding) and probs [n, width] float32 (0 at
padding), each row sorted by decreasing probability and summing to 1 (or empty), plus
``aligned`` [n] bool (the row came from the teacher).

Leaves out: combining teachers (``fusion``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from fuseserve.aligner.alignment import Alignment


class DuplicateRule(StrEnum):
    SUM = "sum"
    FIRST = "first"


class Fallback(StrEnum):
    ONEHOT = "onehot"
    MISSING = "missing"


@dataclass(frozen=True)
class SparseDist:
    """ids: [n, width] int32 (-1 pad); probs: [n, width] float32; aligned: [n] bool;
    tail: [n] float32 mass on no listed id (zeros when rows are renormalised)."""

    ids: np.ndarray
    probs: np.ndarray
    aligned: np.ndarray
    tail: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def __post_init__(self) -> None:
        if len(self.tail) == 0 and len(self.ids):  # not given: no tail mass
            object.__setattr__(self, "tail", np.zeros(len(self.ids), dtype=np.float32))

    @property
    def present(self) -> np.ndarray:
        """[n] bool: rows that carry a distribution."""
        return self.ids[:, 0] >= 0 if self.ids.shape[1] else np.zeros(len(self.ids), bool)


def merge_rows(
    row: np.ndarray, ids: np.ndarray, mass: np.ndarray, n_rows: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``mass`` per (row, id) and lay the result out as padded rows sorted by mass.

    row, ids, mass: [e] flat entries. Returns ids [n_rows, width] int32, probs [n_rows, width]
    float32. Rows with more than ``width`` distinct ids keep the largest.
    """
    out_ids = np.full((n_rows, width), -1, dtype=np.int32)
    out_p = np.zeros((n_rows, width), dtype=np.float32)
    if len(row) == 0 or width == 0:
        return out_ids, out_p
    stride = int(ids.max()) + 1
    keys, inverse = np.unique(row.astype(np.int64) * stride + ids, return_inverse=True)
    summed = np.bincount(inverse, weights=mass, minlength=len(keys))
    u_row = keys // stride
    u_id = keys % stride
    # Order by row, then by decreasing mass (ties: lower id first).
    order = np.lexsort((u_id, -summed, u_row))
    u_row, u_id, summed = u_row[order], u_id[order], summed[order]
    starts = np.searchsorted(u_row, u_row, side="left")
    slot = np.arange(len(u_row)) - starts
    keep = slot < width
    out_ids[u_row[keep], slot[keep]] = u_id[keep]
    out_p[u_row[keep], slot[keep]] = summed[keep]
    return out_ids, out_p


def merge_dense(ids: np.ndarray, mass: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``merge_rows`` for entries already laid out by row: ids, mass [n, c] (id -1 = empty).

    Same result (sum per id, rows sorted by decreasing mass, ties to the lower id, at most
    ``width`` kept) without a global sort: c is small (k), so rows are sorted in place.
    """
    n, c = ids.shape
    out_ids = np.full((n, width), -1, dtype=np.int32)
    out_p = np.zeros((n, width), dtype=np.float32)
    if n == 0 or c == 0 or width == 0:
        return out_ids, out_p
    order = np.argsort(ids, axis=1, kind="stable")
    sid = np.take_along_axis(ids, order, axis=1)
    smass = np.take_along_axis(mass, order, axis=1)
    valid = sid >= 0
    start = np.ones((n, c), dtype=bool)
    start[:, 1:] = sid[:, 1:] != sid[:, :-1]
    group = np.cumsum(start & valid, axis=1) - 1  # group of equal ids, in increasing id order
    flat = (np.arange(n)[:, None] * c + group)[valid]
    summed = np.bincount(flat, weights=smass[valid], minlength=n * c).reshape(n, c)
    gid = np.full(n * c, -1, dtype=np.int64)
    gid[flat] = sid[valid]
    gid = gid.reshape(n, c)
    # stable: equal masses keep increasing id order; empty groups sit after the real ones
    rank = np.argsort(-summed, axis=1, kind="stable")[:, :width]
    top_ids = np.take_along_axis(gid, rank, axis=1)
    top_p = np.take_along_axis(summed, rank, axis=1)
    w = top_ids.shape[1]
    out_ids[:, :w] = top_ids
    out_p[:, :w] = np.where(top_ids >= 0, top_p, 0.0)
    return out_ids, out_p


def _first_occurrence(mapped: np.ndarray) -> np.ndarray:
    """[r, k] bool: entries that are the first of their id in their row (ids < 0 never are)."""
    r, k = mapped.shape
    order = np.argsort(mapped, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(mapped, order, axis=1)
    first_sorted = np.ones((r, k), dtype=bool)
    first_sorted[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = np.zeros((r, k), dtype=bool)
    np.put_along_axis(first, order, first_sorted, axis=1)
    return first & (mapped >= 0)


def project(
    alignment: Alignment,
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    table: np.ndarray,
    temperature: float = 1.0,
    duplicates: DuplicateRule = DuplicateRule.SUM,
    fallback: Fallback = Fallback.ONEHOT,
) -> SparseDist:
    """Project a teacher's per-position top-k onto target ids.

    topk_ids, topk_logprobs: [m, k] teacher ids and log-probs; table: [teacher_vocab] int32
    teacher id -> target id (-1 = none). Returns a SparseDist of width k over the target positions.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    topk_ids = np.asarray(topk_ids)
    topk_logprobs = np.asarray(topk_logprobs, dtype=np.float64)
    n = len(alignment.pair)
    k = topk_ids.shape[1] if topk_ids.ndim == 2 else 0
    width = max(k, 1)
    rows = np.nonzero((alignment.pair >= 0) & (alignment.fallback >= 0))[0]
    src = alignment.pair[rows]
    if len(src) and src.max() >= len(topk_ids):
        raise ValueError(f"alignment refers to teacher position {src.max()} of {len(topk_ids)}")

    mapped = (
        np.asarray(table)[topk_ids[src]].astype(np.int64)
        if len(rows)
        else np.zeros((0, k), dtype=np.int64)
    )
    logits = topk_logprobs[src] / temperature if len(rows) else np.zeros((0, k))
    keep = (mapped >= 0) & np.isfinite(logits)
    if DuplicateRule(duplicates) is DuplicateRule.FIRST and len(rows):
        keep &= _first_occurrence(np.where(keep, mapped, -1))
    has_mass = keep.any(axis=1)
    rows, mapped, logits, keep = rows[has_mass], mapped[has_mass], logits[has_mass], keep[has_mass]

    masked = np.where(keep, logits, -np.inf)
    peak = masked.max(axis=1, keepdims=True) if len(rows) else np.zeros((0, 1))
    weights = np.where(keep, np.exp(masked - peak), 0.0)
    probs = weights / weights.sum(axis=1, keepdims=True) if len(rows) else weights

    aligned = np.zeros(n, dtype=bool)
    aligned[rows] = True
    dense_ids = np.full((n, width), -1, dtype=np.int64)
    dense_p = np.zeros((n, width), dtype=np.float64)
    dense_ids[rows, :k] = np.where(keep, mapped, -1)
    dense_p[rows, :k] = np.where(keep, probs, 0.0)
    if Fallback(fallback) is Fallback.ONEHOT:
        onehot = np.nonzero(~aligned & (alignment.fallback >= 0))[0]
        dense_ids[onehot, 0] = alignment.fallback[onehot]
        dense_p[onehot, 0] = 1.0
    ids, p = merge_dense(dense_ids, dense_p, width)
    return SparseDist(ids=ids, probs=p, aligned=aligned)
