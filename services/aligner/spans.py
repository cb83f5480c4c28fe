"""The ``spans`` method: a teacher distribution at every target position, from the byte stream.

A target position i reads the text up to byte e (its context end) and predicts the target token
that follows, which ends at byte e'. With the teacher's tokens ending at bytes b_0 < b_1 < ...:

1. **Shared boundary** (some teacher position j ends at e): the teacher's candidates at j (its
   top-k plus the actual next token, the *gold*, with its log-prob) each give their probability
   to the target token the target tokenizer would start their text with (``continuation``:
   first-token projection, exact matches pinned).
2. **Byte conditioning** (no teacher position ends at e): take the teacher position j with the
   last boundary b < e; the bytes text[b:e] are already known, so keep only the candidates whose
   text agrees with them (the gold always does), renormalise over those, and project each
   candidate's remainder after e instead of its whole text. A candidate whose text is exactly
   text[b:e] ends at e: what the teacher would say after it is not known, so its share is tail.
3. **Chain rule for the gold**: when the target's next token ends on a teacher boundary e' = b_j'
   it spans the teacher's tokens j+1..j', and its probability is exactly the gold's (conditional)
   probability times the teacher's gold probabilities of tokens j+2..j'; that share of the gold's
   mass goes to the target's actual next token, the rest to the gold's projection. When the
   target's next token ends *inside* the gold (the target splits the gold's bytes more finely),
   all of the gold's mass goes to it: the gold is the text itself, and the target tokenizer
   reading that text starts with its actual next token there, whatever the first-token table
   says for the gold's bytes out of context (Mistral v1 reads " NUMPY" as ' N', 'U', 'MP', 'Y',
   while "UM" alone would start with 'UM').
4. **Tail**: a row at a shared boundary keeps the teacher's probabilities as they are (top-k is
   not renormalised): the mass on no listed id (outside the teacher's top-k, or on tokens with no
   target counterpart) is the row's tail. Rows from byte conditioning are renormalised over the
   candidates that agree with the bytes read (tail: the share of those that end there).
   ``keep_tail=False`` renormalises every row over its listed candidates instead.

When teacher and target tokenizers are the same, every position is case 1 with the target's own
token, so each row is the teacher's own top-k plus gold, with the teacher's tail.

Positions before the teacher's first boundary (the very first one, for a teacher without BOS),
and positions past the end of a truncated teacher sequence, fall back as in ``projection``.

Shapes: target ids/ends [n]; teacher ids/ends [m], top-k [m, k]; rows have width k + 2.
Leaves out: the continuation table itself (``continuation``), combining teachers (``fusion``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fuseserve.aligner.alignment import Alignment, Anchor, fallback_ids
from fuseserve.aligner.continuation import ContinuationTable
from fuseserve.aligner.projection import Fallback, SparseDist, merge_dense
from fuseserve.aligner.tokenview import TokenizerView
from fuseserve.wire.messages import TeacherScores


@dataclass(frozen=True)
class _Rows:
    """The target positions that get a teacher row, and where each sits in the teacher.

    All arrays [r]: ``pos`` target positions; ``j`` the teacher position with the last boundary
    at or before the position's context end; ``shared`` that boundary is the context end;
    ``has_next`` teacher token j+1 exists; ``nxt`` = min(j+1, m-1)."""

    pos: np.ndarray
    j: np.ndarray
    shared: np.ndarray
    has_next: np.ndarray
    nxt: np.ndarray


@dataclass(frozen=True)
class _Candidates:
    """Per row [r, k+1]: the teacher's top-k then the gold when it is not listed (-1 if it is),
    their probabilities, and the column holding the gold ([r]; k when appended)."""

    ids: np.ndarray
    mass: np.ndarray
    gold: np.ndarray  # [r] the teacher's actual next token, -1 past the end
    gold_col: np.ndarray


def project_spans(
    text: str,
    target_ids: np.ndarray,
    target_ends: np.ndarray,
    teacher: TokenizerView,
    scores: TeacherScores,
    teacher_ends: np.ndarray,
    table: ContinuationTable,
    keep_tail: bool = True,
    fallback: Fallback = Fallback.ONEHOT,
    rows_wanted: bool = True,
) -> tuple[Alignment, SparseDist | None]:
    """One teacher's rows over the n target positions (see the module docstring).

    ``rows_wanted=False`` stops once it is known which positions get a distribution (the
    alignment, for coverage) and returns no rows: what fusion does not use is not built."""
    target_ids = np.asarray(target_ids, dtype=np.int64)
    t_ends = np.asarray(target_ends, dtype=np.int64)
    s_ends = np.asarray(teacher_ends, dtype=np.int64)
    n = len(target_ids)
    labels = fallback_ids(target_ids, Anchor.NEXT)
    boundary = np.nonzero(s_ends >= 0)[0]  # teacher positions that end on a byte boundary
    at = _locate_rows(labels, t_ends, s_ends, boundary)
    cands = _candidates(scores, at)
    mapped, mass, ended = _project_candidates(text, teacher, table, t_ends, s_ends, at, cands)

    # byte-conditioned rows are renormalised over what agrees with the bytes read, the candidates
    # that end exactly there becoming tail (what follows them is unknown); any row over 1 by
    # rounding is renormalised too
    kept = mass.sum(axis=1)
    alive = kept > 0
    ended = ended if keep_tail else np.zeros_like(ended)
    total = kept + ended
    renorm = ~at.shared | (not keep_tail) | (kept > 1.0)
    mass = np.where((renorm & alive)[:, None], mass / np.where(alive, total, 1.0)[:, None], mass)
    ended_share = np.where(alive, ended / np.where(alive, total, 1.0), 0.0)
    tail = np.where(renorm, ended_share, np.clip(1.0 - kept, 0.0, 1.0))
    pair = np.full(n, -1, dtype=np.int64)
    pair[at.pos[alive]] = at.j[alive]
    alignment = Alignment(pair=pair, fallback=labels)
    if not rows_wanted:
        return alignment, None

    ids, mass = _chain_rule_for_gold(
        text, teacher, scores, labels, t_ends, s_ends, boundary, at, cands, mapped, mass
    )
    rows = _scatter_rows(n, labels, at.pos, alive, ids, mass, tail, Fallback(fallback))
    return alignment, rows


def _locate_rows(
    labels: np.ndarray, t_ends: np.ndarray, s_ends: np.ndarray, boundary: np.ndarray
) -> _Rows:
    """Cases 1 and 2: target positions whose context end is a teacher boundary, or lies inside
    the teacher token after the last boundary before it."""
    m = len(s_ends)
    slot = np.searchsorted(s_ends[boundary], t_ends, side="right") - 1
    pos = np.nonzero((labels >= 0) & (t_ends >= 0) & (slot >= 0))[0]
    j = boundary[slot[pos]]
    shared = s_ends[j] == t_ends[pos]
    has_next = j + 1 < m
    nxt = np.minimum(j + 1, m - 1)
    inside = ~shared & has_next & (s_ends[nxt] > t_ends[pos])  # e is inside teacher token j+1
    keep = shared | inside
    return _Rows(pos[keep], j[keep], shared[keep], has_next[keep], nxt[keep])


def _candidates(scores: TeacherScores, at: _Rows) -> _Candidates:
    """The top-k at each row's teacher position, plus the gold when it is not among them."""
    s_ids = np.asarray(scores.token_ids, dtype=np.int64)
    topk_ids = np.asarray(scores.topk_ids, dtype=np.int64)
    gold_lp = np.asarray(scores.gold_logprobs, dtype=np.float64)
    r, k = len(at.pos), topk_ids.shape[1]
    ids = np.empty((r, k + 1), dtype=np.int64)
    ids[:, :k] = topk_ids[at.j]
    gold = np.where(at.has_next, s_ids[at.nxt], -1)
    gold_p = np.where(at.has_next, np.exp(np.nan_to_num(gold_lp[at.j], nan=-np.inf)), 0.0)
    in_topk = ids[:, :k] == gold[:, None]
    gold_listed = in_topk.any(axis=1)
    ids[:, k] = np.where(gold_listed, -1, gold)
    mass = np.zeros((r, k + 1))
    mass[:, :k] = np.exp(np.asarray(scores.topk_logprobs, dtype=np.float64)[at.j])
    mass[:, k] = np.where(gold_listed, 0.0, gold_p)
    gold_col = np.where(gold_listed, np.argmax(in_topk, axis=1), k)
    return _Candidates(ids, mass, gold, gold_col)


def _project_candidates(
    text: str,
    teacher: TokenizerView,
    table: ContinuationTable,
    t_ends: np.ndarray,
    s_ends: np.ndarray,
    at: _Rows,
    cands: _Candidates,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each candidate's target token from the byte offset into its text that the row has
    already read, keeping only candidates consistent with those bytes.

    Returns mapped target ids [r, k+1] (-1: dropped), their mass (0 where dropped) and [r] the
    mass of the candidates that end exactly at the bytes read (byte-conditioned rows)."""
    r, width = cands.ids.shape
    shared = at.shared
    known = (t_ends[at.pos] - s_ends[at.j]) * ~shared  # bytes of teacher token j+1 already read
    nbytes = teacher.surface_nbytes
    offset = np.repeat(known[:, None], width, axis=1)
    gold_len = nbytes[np.maximum(cands.gold, 0)]
    gold_offset = gold_len - (s_ends[at.nxt] - t_ends[at.pos])  # robust to a dummy-prefix space
    offset[np.arange(r), cands.gold_col] = np.where(shared, 0, gold_offset)
    keep = cands.ids >= 0
    is_gold = np.zeros((r, width), dtype=bool)
    is_gold[np.arange(r), cands.gold_col] = at.has_next
    ended = np.zeros(r)
    if (~shared).any():
        cand = cands.ids[~shared]
        same = _agrees_with_known(text, teacher, cand, s_ends[at.j[~shared]], known[~shared])
        size = nbytes[np.maximum(cand, 0)]
        keep[~shared] &= same & (size > known[~shared][:, None])
        ends_here = same & (size == known[~shared][:, None]) & ~is_gold[~shared]
        ended[~shared] = (cands.mass[~shared] * ends_here).sum(axis=1)
    gold_ok = (offset >= 0) & (offset < np.maximum(nbytes[np.maximum(cands.ids, 0)], 1))
    keep = np.where(is_gold & ~shared[:, None], gold_ok & (cands.ids >= 0), keep)
    mapped = np.full((r, width), -1, dtype=np.int64)
    where = np.nonzero(keep)
    mapped[where] = table.lookup(cands.ids[where], offset[where])
    return mapped, np.where(mapped >= 0, cands.mass, 0.0), ended


def _chain_rule_for_gold(
    text: str,
    teacher: TokenizerView,
    scores: TeacherScores,
    labels: np.ndarray,
    t_ends: np.ndarray,
    s_ends: np.ndarray,
    boundary: np.ndarray,
    at: _Rows,
    cands: _Candidates,
    mapped: np.ndarray,
    mass: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Case 3: the share of the gold's mass that is exactly the target's next token.

    The target's next token ends on teacher boundary j' (its probability is exact) or inside
    teacher token j'+1 (then the last factor is the mass of the teacher's candidates at j' that
    start with the rest of its bytes). Returns ids and mass [r, k+2]: the last column holds the
    target's next token with that share, taken from the gold's column."""
    n, m = len(t_ends), len(s_ends)
    r = len(at.pos)
    b_ends = s_ends[boundary]
    gold_lp = np.asarray(scores.gold_logprobs, dtype=np.float64)
    next_end = t_ends[np.minimum(at.pos + 1, n - 1)]
    before = np.searchsorted(b_ends, next_end, side="left") - 1  # last boundary < next_end
    jp = np.where(before >= 0, boundary[np.maximum(before, 0)], -1)
    following = np.minimum(before + 1, len(b_ends) - 1)
    on_boundary = (before + 1 < len(b_ends)) & (b_ends[following] == next_end)
    jp = np.where(on_boundary, boundary[following], jp)
    spans_gold = at.has_next & (next_end >= 0) & (jp >= at.j + 1)
    partial = spans_gold & ~on_boundary & (jp + 1 < m)
    cum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(gold_lp, nan=0.0))])
    factor = np.exp(cum[np.maximum(jp, 0)] - cum[np.minimum(at.j + 1, m)])  # tokens j+2..j'
    factor[partial] *= _prefix_mass(text, teacher, scores, s_ends, jp[partial], next_end[partial])
    chain = spans_gold & (on_boundary | partial)
    # the target's next token ends inside the gold: the target splits the gold's own bytes there
    within = at.has_next & (next_end > t_ends[at.pos]) & (next_end < s_ends[at.nxt])
    rows = np.arange(r)
    gold_mass = mass[rows, cands.gold_col] * (mapped[rows, cands.gold_col] >= 0)
    exact = np.where(chain, gold_mass * np.minimum(factor, 1.0), np.where(within, gold_mass, 0.0))
    mass = mass.copy()
    mass[rows, cands.gold_col] -= exact
    ids = np.concatenate([mapped, np.where(exact > 0, labels[at.pos], -1)[:, None]], axis=1)
    return ids, np.concatenate([mass, exact[:, None]], axis=1)


def _scatter_rows(
    n: int,
    labels: np.ndarray,
    pos: np.ndarray,
    alive: np.ndarray,
    ids: np.ndarray,
    mass: np.ndarray,
    tail: np.ndarray,
    fallback: Fallback,
) -> SparseDist:
    """The rows [r, k+2] placed at their target positions among n, duplicates merged, the
    fallback (one-hot on the next token, or nothing) where no teacher row exists."""
    width = ids.shape[1]
    aligned = np.zeros(n, dtype=bool)
    aligned[pos[alive]] = True
    dense_ids = np.full((n, width), -1, dtype=np.int64)
    dense_p = np.zeros((n, width))
    dense_ids[pos[alive]] = np.where(mass[alive] > 0, ids[alive], -1)
    dense_p[pos[alive]] = np.where(mass[alive] > 0, mass[alive], 0.0)
    row_tail = np.zeros(n, dtype=np.float32)
    row_tail[pos[alive]] = tail[alive]
    if fallback is Fallback.ONEHOT:
        onehot = np.nonzero(~aligned & (labels >= 0))[0]
        dense_ids[onehot, 0] = labels[onehot]
        dense_p[onehot, 0] = 1.0
    out_ids, out_p = merge_dense(dense_ids, dense_p, width)
    return SparseDist(out_ids, out_p, aligned, row_tail)


def _prefix_mass(
    text: str,
    teacher: TokenizerView,
    scores: TeacherScores,
    teacher_ends: np.ndarray,
    j: np.ndarray,
    end: np.ndarray,
) -> np.ndarray:
    """[r] the teacher's probability at positions j that its next token starts with the text's
    bytes from its context end to ``end`` (top-k candidates that do, plus the gold, which does)."""
    if len(j) == 0:
        return np.zeros(0)
    topk = np.asarray(scores.topk_ids, dtype=np.int64)[j]
    probs = np.exp(np.asarray(scores.topk_logprobs, dtype=np.float64)[j])
    gold = np.asarray(scores.token_ids, dtype=np.int64)[j + 1]
    gold_lp = np.asarray(scores.gold_logprobs, dtype=np.float64)[j]
    match = _starts_with_known(text, teacher, topk, teacher_ends[j], end - teacher_ends[j])
    others = (probs * (match & (topk != gold[:, None]))).sum(axis=1)
    mass: np.ndarray = np.minimum(others + np.exp(np.nan_to_num(gold_lp, nan=-np.inf)), 1.0)
    return mass


def _starts_with_known(
    text: str, teacher: TokenizerView, cand: np.ndarray, start: np.ndarray, known: np.ndarray
) -> np.ndarray:
    """[r, c] bool: candidate texts longer than ``known`` bytes that start with the text's bytes
    [start, start + known) of their row."""
    longer = teacher.surface_nbytes[np.maximum(cand, 0)] > known[:, None]
    starts: np.ndarray = _agrees_with_known(text, teacher, cand, start, known) & longer
    return starts


def _agrees_with_known(
    text: str, teacher: TokenizerView, cand: np.ndarray, start: np.ndarray, known: np.ndarray
) -> np.ndarray:
    """[r, c] bool: candidates at least ``known`` bytes long whose text starts with the text's
    bytes [start, start + known) of their row."""
    if len(cand) == 0:
        return np.zeros(cand.shape, dtype=bool)
    data = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    width = int(known.max())
    cols = np.arange(width)
    wanted = data[np.minimum(start[:, None] + cols, len(data) - 1)]  # [r, width]
    matrix = teacher.surface_byte_matrix
    if matrix.shape[1] < width:
        matrix = np.pad(matrix, ((0, 0), (0, width - matrix.shape[1])))
    have = matrix[np.maximum(cand, 0), :width]  # [r, c, width]
    beyond = cols[None, :] >= known[:, None]  # [r, width]
    same = ((have == wanted[:, None, :]) | beyond[:, None, :]).all(axis=-1)
    long_enough = teacher.surface_nbytes[np.maximum(cand, 0)] >= known[:, None]
    agrees: np.ndarray = same & long_enough & (cand >= 0)
    return agrees
