"""Fusion of several teachers' projected distributions into one target distribution.

Covers the paper's two fusion functions over K teachers' ``SparseDist`` rows:

- ``min_ce``: take the distribution of the teacher with the lowest cross-entropy, per block
  (``sequence`` level, the paper's default) or per position (``token`` level); ties go to the
  lower teacher index.
- ``avg_ce``: the weighted sum of the teachers' distributions with weights
  ``softmax_k(exp(-CE_k))``, per block or per position.

Cross-entropy of a teacher on a block is the mean of ``-log p(gold next token)`` over its own
positions. At ``token`` level a teacher's cost at target position i is ``-log p(gold)`` at its
paired position, or its block CE where it has no pair. A teacher with no distribution at a
position (``missing`` fallback) takes no part there.

Leaves out: computing the teachers' outputs and alignment (``pipeline``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fuseserve.aligner.projection import SparseDist, merge_rows


class FusionMethod(StrEnum):
    MIN_CE = "min_ce"
    AVG_CE = "avg_ce"


class FusionLevel(StrEnum):
    SEQUENCE = "sequence"
    TOKEN = "token"


@dataclass(frozen=True)
class Fused:
    """ids: [n, width] int32 (-1 pad); probs: [n, width] float32 and tail: [n] float32, each
    row's probs plus tail sum to 1 (or the row is empty); chosen: [n] int16 teacher index per
    position (-1: averaged, or no distribution)."""

    ids: np.ndarray
    probs: np.ndarray
    chosen: np.ndarray
    tail: np.ndarray


def sequence_ce(gold_logprobs: np.ndarray) -> float:
    """Mean of -log p(gold) over the finite entries of [m] gold log-probs (inf if none)."""
    gold = np.asarray(gold_logprobs, dtype=np.float64)
    gold = gold[np.isfinite(gold)]
    return float(-gold.mean()) if len(gold) else float("inf")


def token_costs(
    pairs: Sequence[np.ndarray], golds: Sequence[np.ndarray], ces: Sequence[float]
) -> np.ndarray:
    """[K, n] per-position cost: -gold log-prob at the paired teacher position, else block CE."""
    out = np.empty((len(pairs), len(pairs[0]) if pairs else 0), dtype=np.float64)
    for k, (pair, gold, ce) in enumerate(zip(pairs, golds, ces)):
        gold = np.asarray(gold, dtype=np.float64)
        cost = np.full(len(pair), ce, dtype=np.float64)
        has = pair >= 0
        values = -gold[pair[has]]
        cost[has] = np.where(np.isfinite(values), values, ce)
        out[k] = cost
    return out


def fuse(
    dists: Sequence[SparseDist],
    ce: Sequence[float],
    method: FusionMethod = FusionMethod.MIN_CE,
    level: FusionLevel = FusionLevel.SEQUENCE,
    costs: np.ndarray | None = None,
) -> Fused:
    """Fuse K teachers' distributions over the same n target positions.

    ce: [K] block cross-entropies; costs: [K, n] per-position costs (needed for ``token`` level).
    """
    if not dists:
        raise ValueError("fusion needs at least one teacher distribution")
    n = len(dists[0].ids)
    if any(len(d.ids) != n for d in dists):
        raise ValueError("all teacher distributions must cover the same target positions")
    ce_arr = np.asarray(ce, dtype=np.float64)
    if FusionLevel(level) is FusionLevel.TOKEN:
        if costs is None:
            raise ValueError("token-level fusion needs per-position costs")
        cost = np.asarray(costs, dtype=np.float64)
    else:
        cost = np.repeat(ce_arr[:, None], n, axis=1)
    present = np.stack([d.present for d in dists])  # [K, n]
    cost = np.where(present, cost, np.inf)

    if FusionMethod(method) is FusionMethod.MIN_CE:
        choice = np.argmin(cost, axis=0)
        none = ~present.any(axis=0)
        chosen = np.where(none, -1, choice).astype(np.int16)
        width = max(d.ids.shape[1] for d in dists)
        ids = np.full((n, width), -1, dtype=np.int32)
        probs = np.zeros((n, width), dtype=np.float32)
        tail = np.zeros(n, dtype=np.float32)
        for k, d in enumerate(dists):
            rows = chosen == k
            ids[rows, : d.ids.shape[1]] = d.ids[rows]
            probs[rows, : d.ids.shape[1]] = d.probs[rows]
            tail[rows] = d.tail[rows]
        return Fused(ids=ids, probs=probs, chosen=chosen, tail=tail)

    # avg_ce: weights softmax_k(exp(-cost)) over the teachers present at each position.
    score = np.where(present, np.exp(-np.where(np.isfinite(cost), cost, 0.0)), -np.inf)
    peak = np.max(score, axis=0, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    weights = np.where(present, np.exp(score - peak), 0.0)
    total = weights.sum(axis=0, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    row_parts: list[np.ndarray] = []
    id_parts: list[np.ndarray] = []
    mass_parts: list[np.ndarray] = []
    for k, d in enumerate(dists):
        valid = d.ids >= 0
        r = np.nonzero(valid)[0]
        row_parts.append(r)
        id_parts.append(d.ids[valid].astype(np.int64))
        mass_parts.append(d.probs[valid].astype(np.float64) * weights[k, r])
    width = sum(d.ids.shape[1] for d in dists)
    out_ids, out_p = merge_rows(
        np.concatenate(row_parts), np.concatenate(id_parts), np.concatenate(mass_parts), n, width
    )
    tail = np.sum([weights[k] * d.tail for k, d in enumerate(dists)], axis=0).astype(np.float32)
    return Fused(ids=out_ids, probs=out_p, chosen=np.full(n, -1, dtype=np.int16), tail=tail)
