"""Vocabulary mapping from a teacher's vocabulary onto the target's (EM, then MinED).

Covers: for every teacher id, the target id it maps to, whether the match is exact (EM) or by
minimum edit distance (MinED), and that distance; two string modes:

- ``surface`` (default): compare canonical surfaces (the text a token stands for). Exact matches
  first try the identical raw token string, then the same surface (preferring ordinary pieces over
  ``<0xNN>`` byte pieces, then the lowest id). Teacher specials map by role (BOS->BOS, EOS->EOS,
  UNK->UNK, PAD->PAD) and other specials to nothing; target specials are never chosen by MinED.
- ``fusellm``: the original code's rule: swap the teacher's word-boundary marker for the target's,
  exact string match, else minimum edit distance over every target token string.

MinED ties go to the lowest target id. Edit distances are computed with rapidfuzz's batched
``cdist`` in row chunks, so memory stays bounded. Serialisation uses the wire codec.

Leaves out: where maps are stored (see ``vocabmap_store``) and how teacher distributions use them
(see ``projection``). No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from fuseserve.aligner.tokenview import TokenizerView, marker_of
from fuseserve.wire import codec

VOCABMAP_SCHEMA = 1


class StringMode(StrEnum):
    SURFACE = "surface"
    FUSELLM = "fusellm"


@dataclass(frozen=True)
class VocabMap:
    """teacher id -> target id. Arrays are [teacher_vocab]; ``target_ids`` is -1 where unmapped."""

    teacher_fingerprint: str
    target_fingerprint: str
    mode: StringMode
    target_ids: np.ndarray  # int32
    exact: np.ndarray  # bool
    distance: np.ndarray  # int32, 0 for exact matches
    corpus: str = ""  # fingerprint of the corpus that re-ranked it ("" = not re-ranked)

    @property
    def teacher_vocab_size(self) -> int:
        return len(self.target_ids)

    def table(self, soft: bool) -> np.ndarray:
        """[teacher_vocab] int32: the lookup table; ``soft=False`` keeps exact matches only."""
        if soft:
            return self.target_ids
        return np.where(self.exact, self.target_ids, -1).astype(np.int32)

    @property
    def exact_fraction(self) -> float:
        return float(self.exact.mean()) if len(self.exact) else 0.0

    def to_bytes(self) -> bytes:
        return codec.encode(
            {"target_ids": self.target_ids, "exact": self.exact, "distance": self.distance},
            meta={
                "kind": "vocabmap",
                "schema": VOCABMAP_SCHEMA,
                "teacher": self.teacher_fingerprint,
                "target": self.target_fingerprint,
                "mode": str(self.mode),
                "corpus": self.corpus,
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> VocabMap:
        arrays, meta = codec.decode(data)
        if meta.get("kind") != "vocabmap" or meta.get("schema") != VOCABMAP_SCHEMA:
            raise codec.CodecError("not a vocabulary map of this schema version")
        return cls(
            teacher_fingerprint=meta["teacher"],
            target_fingerprint=meta["target"],
            mode=StringMode(meta["mode"]),
            target_ids=arrays["target_ids"].astype(np.int32),
            exact=arrays["exact"].astype(bool),
            distance=arrays["distance"].astype(np.int32),
            corpus=str(meta.get("corpus", "")),
        )


ProgressFn = Callable[[int, int], None]


def min_edit_distance_choice(
    queries: list[str],
    choices: list[str],
    workers: int = -1,
    chunk_rows: int = 512,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the index of the closest choice by Levenshtein distance (first on ties).

    Returns ([q] int64 indices, [q] int32 distances).
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    best = np.zeros(len(queries), dtype=np.int64)
    dist = np.zeros(len(queries), dtype=np.int32)
    if not choices:
        raise ValueError("choices is empty: the target vocabulary has no ordinary tokens")
    for start in range(0, len(queries), chunk_rows):
        rows = queries[start : start + chunk_rows]
        matrix = cdist(rows, choices, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)
        idx = np.argmin(matrix, axis=1)
        best[start : start + len(rows)] = idx
        dist[start : start + len(rows)] = matrix[np.arange(len(rows)), idx]
        if progress is not None:
            progress(min(start + chunk_rows, len(queries)), len(queries))
    return best, dist


def best_surface_ids(target: TokenizerView) -> dict[str, int]:
    """Surface -> preferred ordinary target id (ordinary pieces before byte pieces, then lowest)."""
    best: dict[str, int] = {}
    byte_piece = target.is_byte_piece
    special = target.is_special
    for i, surface in enumerate(target.surfaces):
        if special[i] or not surface:
            continue
        current = best.get(surface)
        if current is None or (byte_piece[current] and not byte_piece[i]):
            best[surface] = i
    return best


def build_vocab_map(
    teacher: TokenizerView,
    target: TokenizerView,
    mode: StringMode = StringMode.SURFACE,
    workers: int = -1,
    progress: ProgressFn | None = None,
) -> VocabMap:
    """Map every teacher id to a target id (EM first, MinED for the rest)."""
    mode = StringMode(mode)
    n = teacher.vocab_size
    target_ids = np.full(n, -1, dtype=np.int32)
    exact = np.zeros(n, dtype=bool)
    distance = np.zeros(n, dtype=np.int32)
    pending: list[int] = []
    pending_queries: list[str] = []

    if mode is StringMode.FUSELLM:
        t_marker, s_marker = marker_of(teacher.scheme), marker_of(target.scheme)
        choices = list(target.tokens)
        choice_ids = np.arange(target.vocab_size, dtype=np.int64)
        for i, tok in enumerate(teacher.tokens):
            query = tok.replace(t_marker, s_marker) if t_marker and s_marker else tok
            hit = target.id_of.get(query)
            if hit is not None:
                target_ids[i], exact[i] = hit, True
            else:
                pending.append(i)
                pending_queries.append(query)
    else:
        by_surface = best_surface_ids(target)
        roles: dict[int, int] = {}
        for source, dest in (
            (teacher.bos_id, target.bos_id),
            (teacher.eos_id, target.eos_id),
            (teacher.unk_id, target.unk_id),
            (teacher.pad_id, target.pad_id),
        ):
            if source is not None and dest is not None:
                roles.setdefault(source, dest)
        same_scheme = teacher.scheme == target.scheme
        target_special = target.is_special
        for i, tok in enumerate(teacher.tokens):
            if i in teacher.special_ids:
                mapped = roles.get(i)
                if mapped is not None:
                    target_ids[i], exact[i] = mapped, True
                continue
            if same_scheme:
                hit = target.id_of.get(tok)
                if hit is not None and not target_special[hit]:
                    target_ids[i], exact[i] = hit, True
                    continue
            surface = teacher.surfaces[i]
            hit = by_surface.get(surface)
            if hit is not None:
                target_ids[i], exact[i] = hit, True
            elif surface:
                pending.append(i)
                pending_queries.append(surface)
        ordered = sorted(by_surface.items(), key=lambda kv: kv[1])
        choices = [s for s, _ in ordered]
        choice_ids = np.array([i for _, i in ordered], dtype=np.int64)

    if pending:
        idx, dist = min_edit_distance_choice(pending_queries, choices, workers, progress=progress)
        rows = np.array(pending, dtype=np.int64)
        target_ids[rows] = choice_ids[idx]
        distance[rows] = dist
    return VocabMap(
        teacher_fingerprint=teacher.fingerprint,
        target_fingerprint=target.fingerprint,
        mode=mode,
        target_ids=target_ids,
        exact=exact,
        distance=distance,
    )
