"""Sequence alignment: which teacher position's distribution serves each target position.

Covers two methods, both returning an ``Alignment`` (for each target position, the paired teacher
position or -1, and the target id of the one-hot fallback):

- ``offsets`` (default): target position i and teacher position j pair when their contexts end at
  the same UTF-8 byte of the text, i.e. both distributions predict what follows the same prefix.
  O(N + M) after the tokenizers' offsets; special tokens pair with nothing (a leading special's
  context is the empty text).
- ``dtw``: the paper's dynamic programme over token strings with edit-distance cell cost
  (marker-stripped raw strings in compat mode, space-free surfaces by default).
  ``dtw_compat=True`` reproduces the original FuseLLM code exactly: all tokens, marker-stripped
  strings, ties broken diagonal, then up (teacher), then left (target), a target token paired
  when it maps to exactly one teacher token and the two strings match after the marker swap.
  The default instead skips special tokens, pairs only mutual one-to-one matches of equal
  surfaces (or equal space-free surfaces ending at the same byte), and breaks
  ties between equally cheap predecessors by the smaller gap between the two tokens' byte ends
  in the text (then diagonal, up, left), so the path follows the text rather than a fixed
  preference.

Anchors: ``next`` (default) pairs by the *predicted* token, since the distribution at i predicts
token i+1, and falls back to one-hot of t_{i+1}; ``input`` pairs by the input token and falls back
to one-hot of t_i, as the original code does (an off-by-one, kept for comparison only).

The DP runs row by row: with prefix sums S of a row's costs, D[i, j] = S_j + min_{k<=j}(A_k - S_k)
where A_k = c[i, k] + min(D[i-1, k], D[i-1, k-1]), so each row is a few vectorised numpy calls.
Costs are integers, so the result equals the per-cell loop exactly.

Leaves out: turning pairs into distributions (``projection``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fuseserve.aligner.tokenview import Scheme, TokenizerView, marker_of


class AlignMethod(StrEnum):
    OFFSETS = "offsets"
    DTW = "dtw"
    SPANS = "spans"  # byte conditioning + first-token projection (``spans``)


class Anchor(StrEnum):
    NEXT = "next"
    INPUT = "input"


@dataclass(frozen=True)
class Alignment:
    """pair: [n_target] int64 teacher position or -1; fallback: [n_target] int64 target id of
    the one-hot fallback, or -1 where the position has no label (the last one, for ``next``)."""

    pair: np.ndarray
    fallback: np.ndarray

    @property
    def coverage(self) -> float:
        """Fraction of labelled positions that have a teacher distribution."""
        labelled = self.fallback >= 0
        if not labelled.any():
            return 0.0
        return float((self.pair[labelled] >= 0).mean())


def fallback_ids(target_ids: np.ndarray, anchor: Anchor) -> np.ndarray:
    """[n] int64: the token each position is trained towards (next token, or input for compat)."""
    target_ids = np.asarray(target_ids, dtype=np.int64)
    if Anchor(anchor) is Anchor.INPUT:
        return target_ids.copy()
    out = np.full(len(target_ids), -1, dtype=np.int64)
    out[:-1] = target_ids[1:]
    return out


# ----------------------------------------------------------------------------- offsets
def _rank_from_end(ends: np.ndarray) -> np.ndarray:
    """Within each run of equal values, 0 for the last element, 1 for the one before, ..."""
    n = len(ends)
    rank = np.zeros(n, dtype=np.int64)
    for i in range(n - 2, -1, -1):
        if ends[i] == ends[i + 1]:
            rank[i] = rank[i + 1] + 1
    return rank


def align_offsets(
    target_ids: np.ndarray, target_ends: np.ndarray, teacher_ends: np.ndarray
) -> Alignment:
    """Pair positions whose contexts end at the same byte (see ``tokenview.context_ends``).

    target_ends: [n], teacher_ends: [m] int64 byte ends (negative = never pairs). Where several
    positions on one side end at the same byte, they pair from the last backwards, so identical
    tokenizations pair one-to-one.
    """
    t_ends = np.asarray(target_ends, dtype=np.int64)
    s_ends = np.asarray(teacher_ends, dtype=np.int64)
    pair = np.full(len(t_ends), -1, dtype=np.int64)
    t_ok = np.nonzero(t_ends >= 0)[0]
    s_ok = np.nonzero(s_ends >= 0)[0]
    if len(t_ok) and len(s_ok):
        t_dup = np.any(t_ends[t_ok][1:] == t_ends[t_ok][:-1])
        s_dup = np.any(s_ends[s_ok][1:] == s_ends[s_ok][:-1])
        t_rank = _rank_from_end(t_ends[t_ok]) if t_dup else np.zeros(len(t_ok), np.int64)
        s_rank = _rank_from_end(s_ends[s_ok]) if s_dup else np.zeros(len(s_ok), np.int64)
        width = max(len(t_ok), len(s_ok)) + 1
        t_key = t_ends[t_ok] * width + t_rank
        s_key = s_ends[s_ok] * width + s_rank
        _, ti, si = np.intersect1d(t_key, s_key, assume_unique=True, return_indices=True)
        pair[t_ok[ti]] = s_ok[si]
    return Alignment(pair=pair, fallback=fallback_ids(target_ids, Anchor.NEXT))


# ----------------------------------------------------------------------------- DTW core
def edit_distance_matrix(rows: Sequence[str], cols: Sequence[str], workers: int = -1) -> np.ndarray:
    """[len(rows), len(cols)] int32 Levenshtein distances, computed once per distinct pair."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    if not rows or not cols:
        return np.zeros((len(rows), len(cols)), dtype=np.int32)
    row_index = {s: i for i, s in enumerate(dict.fromkeys(rows))}
    col_index = {s: i for i, s in enumerate(dict.fromkeys(cols))}
    ri = np.array([row_index[s] for s in rows], dtype=np.intp)
    ci = np.array([col_index[s] for s in cols], dtype=np.intp)
    unique = cdist(
        list(row_index),
        list(col_index),
        scorer=Levenshtein.distance,
        dtype=np.int32,
        workers=workers,
    )
    return np.take(np.take(unique, ri, axis=0), ci, axis=1)


def cumulative_cost(cost: np.ndarray) -> np.ndarray:
    """[n, m] DTW accumulated cost D[i, j] = c[i, j] + min(D[i-1, j], D[i, j-1], D[i-1, j-1]).

    cost: [n, m] non-negative integers. Row by row with prefix sums (see the module docstring);
    int32 when the totals fit, else int64.
    """
    cost = np.asarray(cost)
    n, m = cost.shape
    fits = int(cost.max(initial=0)) * (n + m + 1) < np.iinfo(np.int32).max
    cost = cost.astype(np.int32 if fits else np.int64, copy=False)
    acc = np.empty_like(cost)
    if n == 0 or m == 0:
        return acc
    prefix = np.cumsum(cost, axis=1, dtype=cost.dtype)
    from_left = cost - prefix  # A_k - S_k = c[i, k] - S_k + min(D[i-1, k], D[i-1, k-1])
    acc[0] = prefix[0]
    best_above = np.empty(m, dtype=cost.dtype)
    for i in range(1, n):
        prev = acc[i - 1]
        best_above[0] = prev[0]
        np.minimum(prev[1:], prev[:-1], out=best_above[1:])
        best_above += from_left[i]
        np.minimum.accumulate(best_above, out=acc[i])
        acc[i] += prefix[i]
    return acc


def backtrack(
    acc: np.ndarray, row_ends: np.ndarray | None = None, col_ends: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The optimal path from (n-1, m-1) back to (0, 0).

    Among predecessors of equal accumulated cost, the original order is diagonal, then up
    (row - 1), then left (col - 1). With ``row_ends``/``col_ends`` ([n], [m] byte ends), ties are
    first broken by the smaller gap |row_end - col_end| of the predecessor cell, so tokens that
    end at the same place in the text stay paired. Returns (rows, cols), each [path_len] int64,
    in increasing order.
    """
    n, m = acc.shape
    i, j = n - 1, m - 1
    rows, cols = [i], [j]
    inf = float("inf")
    get = acc.item
    use_gap = row_ends is not None and col_ends is not None
    r_end: list[int] = row_ends.tolist() if row_ends is not None else []
    c_end: list[int] = col_ends.tolist() if col_ends is not None else []
    while i > 0 or j > 0:
        diag = get(i - 1, j - 1) if i > 0 and j > 0 else inf
        up = get(i - 1, j) if i > 0 else inf
        left = get(i, j - 1) if j > 0 else inf
        best = min(diag, up, left)
        ties = (diag == best) + (up == best) + (left == best)
        if ties > 1 and use_gap:
            options = []
            if diag == best:
                options.append((abs(r_end[i - 1] - c_end[j - 1]), 0, i - 1, j - 1))
            if up == best:
                options.append((abs(r_end[i - 1] - c_end[j]), 1, i - 1, j))
            if left == best:
                options.append((abs(r_end[i] - c_end[j - 1]), 2, i, j - 1))
            _, _, i, j = min(options)
        elif diag == best:
            i, j = i - 1, j - 1
        elif up == best:
            i -= 1
        else:
            j -= 1
        rows.append(i)
        cols.append(j)
    return np.array(rows[::-1], dtype=np.int64), np.array(cols[::-1], dtype=np.int64)


def dtw_path(
    cost: np.ndarray, row_ends: np.ndarray | None = None, col_ends: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal DTW path (rows, cols) of an integer cost matrix (see ``backtrack`` for ties)."""
    return backtrack(cumulative_cost(cost), row_ends, col_ends)


# ----------------------------------------------------------------------------- DTW alignment
def align_dtw(
    target_ids: np.ndarray,
    teacher_ids: np.ndarray,
    target: TokenizerView,
    teacher: TokenizerView,
    anchor: Anchor = Anchor.NEXT,
    soft_table: np.ndarray | None = None,
    compat: bool = False,
    target_ends: np.ndarray | None = None,
    teacher_ends: np.ndarray | None = None,
) -> Alignment:
    """Align by DTW over marker-stripped token strings (teacher = rows, target = columns).

    soft_table: [teacher_vocab] teacher id -> target id (MinED map) to accept a pair whose strings
    differ but map onto each other (the paper's ``soft`` mode); None accepts exact matches only.
    target_ends / teacher_ends: byte ends for the default tie-break (ignored with ``compat``).
    """
    anchor = Anchor(anchor)
    target_ids = np.asarray(target_ids, dtype=np.int64)
    teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
    fallback = fallback_ids(target_ids, anchor)
    pair = np.full(len(target_ids), -1, dtype=np.int64)
    if compat:
        t_sel = np.arange(len(target_ids))
        s_sel = np.arange(len(teacher_ids))
    else:
        t_sel = np.nonzero(~target.is_special[target_ids])[0]
        s_sel = np.nonzero(~teacher.is_special[teacher_ids])[0]
    if len(t_sel) == 0 or len(s_sel) == 0:
        return Alignment(pair=pair, fallback=fallback)

    t_tok = target_ids[t_sel]
    s_tok = teacher_ids[s_sel]
    s_str = teacher.stripped if compat else teacher.compact_surfaces
    t_str = target.stripped if compat else target.compact_surfaces
    cost = edit_distance_matrix([s_str[k] for k in s_tok], [t_str[k] for k in t_tok])
    use_gap = not compat and target_ends is not None and teacher_ends is not None
    rows, cols = dtw_path(
        cost,
        np.asarray(teacher_ends, np.int64)[s_sel] if use_gap else None,
        np.asarray(target_ends, np.int64)[t_sel] if use_gap else None,
    )
    row_degree = np.bincount(rows, minlength=len(s_sel))
    col_degree = np.bincount(cols, minlength=len(t_sel))

    one_to_one = col_degree[cols] == 1
    if not compat:
        one_to_one &= row_degree[rows] == 1
    rows, cols = rows[one_to_one], cols[one_to_one]
    t_pos, s_pos = t_sel[cols], s_sel[rows]
    ok = _tokens_match(
        target_ids[t_pos], teacher_ids[s_pos], t_pos, target, teacher, soft_table, compat
    )
    if use_gap:  # the same text span under different spellings (e.g. a dummy prefix space)
        same_end = np.asarray(target_ends)[t_pos] == np.asarray(teacher_ends)[s_pos]
        same_text = np.array(
            [t_str[a] == s_str[b] for a, b in zip(target_ids[t_pos], teacher_ids[s_pos])], bool
        )
        ok |= same_end & same_text
    t_pos, s_pos = t_pos[ok], s_pos[ok]
    if anchor is Anchor.NEXT:
        keep = (t_pos >= 1) & (s_pos >= 1)
        pair[t_pos[keep] - 1] = s_pos[keep] - 1
    else:
        pair[t_pos] = s_pos
    return Alignment(pair=pair, fallback=fallback)


def _tokens_match(
    t_ids: np.ndarray,
    s_ids: np.ndarray,
    t_pos: np.ndarray,
    target: TokenizerView,
    teacher: TokenizerView,
    soft_table: np.ndarray | None,
    compat: bool,
) -> np.ndarray:
    """[pairs] bool: whether each aligned (target, teacher) token pair counts as the same token."""
    if compat:
        t_marker, s_marker = marker_of(target.scheme), marker_of(teacher.scheme)
        out = np.zeros(len(t_ids), dtype=bool)
        for n, (t, s, pos) in enumerate(zip(t_ids.tolist(), s_ids.tolist(), t_pos.tolist())):
            base = target.tokens[t]
            blend = teacher.tokens[s]
            if s_marker and t_marker:
                blend = blend.replace(s_marker, t_marker)
            if (
                teacher.scheme is Scheme.BYTE_LEVEL
                and pos == 0
                and t_marker
                and base.startswith(t_marker)
                and not blend.startswith(t_marker)
            ):
                blend = t_marker + blend  # the original's special case for GPT-2-style teachers
            out[n] = base == blend
    else:
        t_surf, s_surf = target.surfaces, teacher.surfaces
        out = np.fromiter(
            (t_surf[t] == s_surf[s] for t, s in zip(t_ids.tolist(), s_ids.tolist())),
            dtype=bool,
            count=len(t_ids),
        )
    if soft_table is not None:
        out |= np.asarray(soft_table)[s_ids] == t_ids
    return out
