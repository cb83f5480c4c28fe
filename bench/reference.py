"""Straightforward pure-Python versions of the paper's algorithms: the baseline and the oracle.

Covers, written for clarity and not speed, directly from the definitions: Levenshtein distance,
the DTW of the original FuseLLM code (per-cell edit distance, ties diagonal/up/left), MinED over a
vocabulary by a per-pair loop, and the original code's per-position distribution transform
(one-to-one rule, marker-swap matching, first duplicate kept, one-hot of the *input* token).
Benchmarks time the fast core against these; tests check the core equals them. Lives with the
benchmarks, not in the shipped package: nothing in fuseserve runs it.

Leaves out: anything fast. Do not use on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; unit costs), two-row DP."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def dtw_reference(
    rows: Sequence[str], cols: Sequence[str], dist: Callable[[str, str], int] = levenshtein
) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """The paper's DTW: returns the path [(row, col)] and, per column, the rows paired with it."""
    n, m = len(rows), len(cols)
    inf = math.inf
    acc = [[inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0
    for i in range(n):
        for j in range(m):
            cost = dist(rows[i], cols[j])
            acc[i + 1][j + 1] = cost + min(acc[i][j + 1], acc[i + 1][j], acc[i][j])
    i, j = n - 1, m - 1
    path = []
    while i > 0 or j > 0:
        path.append((i, j))
        diag = acc[i][j] if i > 0 and j > 0 else inf
        up = acc[i][j + 1] if i > 0 else inf
        left = acc[i + 1][j] if j > 0 else inf
        best = min(diag, up, left)
        if diag == best:
            i, j = i - 1, j - 1
        elif up == best:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    path.reverse()
    per_col: list[list[int]] = [[] for _ in range(m)]
    for r, c in path:
        per_col[c].append(r)
    return path, per_col


def min_ed_reference(query: str, choices: Sequence[str]) -> tuple[int, int]:
    """(index, distance) of the first choice at minimum edit distance, by a per-pair loop."""
    best, best_d = -1, math.inf
    for index, choice in enumerate(choices):
        d = levenshtein(query, choice)
        if d < best_d:
            best, best_d = index, d
    return best, int(best_d)


def fusellm_transform_reference(
    target_tokens: Sequence[str],
    teacher_tokens: Sequence[str],
    target_marker: str,
    teacher_marker: str,
    target_vocab: dict[str, int],
    teacher_vocab_tokens: Sequence[str],
    topk_ids: Sequence[Sequence[int]],
    topk_logprobs: Sequence[Sequence[float]],
    soft_mapping: dict[str, str] | None,
    teacher_is_byte_level: bool,
) -> list[tuple[list[int], list[float]]]:
    """The original per-position transform, as (target ids, values) lists per target position.

    Values are the teacher's log-probs for aligned positions and ``1.0`` (a probability) for the
    one-hot fallback at the *input* token, as in the original code.
    """

    def strip(tok: str, marker: str) -> str:
        return tok.replace(marker, "") if marker else tok

    def swap(tok: str) -> str:
        if teacher_marker and target_marker:
            return tok.replace(teacher_marker, target_marker)
        return tok

    _, per_col = dtw_reference(
        [strip(t, teacher_marker) for t in teacher_tokens],
        [strip(t, target_marker) for t in target_tokens],
    )
    out: list[tuple[list[int], list[float]]] = []
    for i, rows in enumerate(per_col):
        base = target_tokens[i]
        onehot = ([target_vocab[base]], [1.0])
        if len(rows) != 1:
            out.append(onehot)
            continue
        j = rows[0]
        blend = swap(teacher_tokens[j])
        if (
            teacher_is_byte_level
            and i == 0
            and target_marker
            and base.startswith(target_marker)
            and not blend.startswith(target_marker)
        ):
            blend = target_marker + blend
        matched = base == blend or (soft_mapping is not None and soft_mapping.get(blend) == base)
        if not matched:
            out.append(onehot)
            continue
        ids: list[int] = []
        values: list[float] = []
        for tid, lp in zip(topk_ids[j], topk_logprobs[j]):
            tok = swap(teacher_vocab_tokens[tid])
            if soft_mapping is not None:
                tok = soft_mapping[tok]
            if tok in target_vocab and target_vocab[tok] not in ids:
                ids.append(target_vocab[tok])
                values.append(lp)
        out.append((ids, values))
    return out
