"""The calls services make to each other, as plain values: a teacher Score, an aligner Fuse.

Covers ``ScoreQuery`` (texts, k, what to do with a text over the teacher's length, the BOS
choice, the float width of the reply) and ``FuseCall`` (a fuse request's id, texts or target
token ids, and optional overrides, ``None`` where the service default applies). Frozen; no
checks beyond their types: each service validates what it receives and names the bad field.

Leaves out: protobuf encodings (``fuseserve.wire.convert``) and the answers (``messages``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ScoreQuery:
    """Score ``texts`` with top-``k``; ``truncate``: cut a text over the teacher's maximum length
    (else reject it); ``add_bos``: None as the tokenizer does by default."""

    texts: tuple[str, ...]
    k: int
    truncate: bool = False
    add_bos: bool | None = None
    float_dtype: str = "f32"


@dataclass(frozen=True)
class FuseCall:
    """One fuse request. ``k``, ``preset``, ``options``, ``teachers``: None for the service's
    defaults; ``float_dtype``: of the fused probabilities in the reply; ``token_ids``: target
    ids per block instead of ``texts`` (then empty)."""

    id: str
    texts: tuple[str, ...]
    k: int | None = None
    preset: str | None = None
    options: dict[str, Any] | None = None
    teachers: tuple[str, ...] | None = None
    float_dtype: str = "f32"
    token_ids: tuple[tuple[int, ...], ...] | None = None
