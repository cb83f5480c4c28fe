"""The two array bundles that cross service boundaries: a teacher's scores and a fused block.

Covers: ``TeacherScores`` (what a teacher returns for one text) and ``FusedBlock`` (what the
aligner returns for one block), their shape checks, and their encoding with the array codec (also
the cache's value format). Probabilities may travel as float16 to halve the payload; ids are
always int32.

Leaves out: gRPC framing (generated stubs) and how the arrays are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fuseserve.wire import codec

SCORES_SCHEMA = 1
FUSED_SCHEMA = 2  # 2: each row carries its tail mass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise codec.CodecError(message)


@dataclass(frozen=True)
class TeacherScores:
    """One teacher's view of one text.

    token_ids: [m] int32 its own tokens; offsets: [m, 2] int32 character (start, end) in the text;
    topk_ids: [m, k] int32 and topk_logprobs: [m, k] float32, the top-k next-token predictions at
    each position (log-probs of the full softmax, descending); gold_logprobs: [m] float32, the
    log-prob of the actual next token (NaN at the last position).
    """

    token_ids: np.ndarray
    offsets: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    gold_logprobs: np.ndarray
    truncated: bool = False

    def __post_init__(self) -> None:
        m = len(self.token_ids)
        _check(self.offsets.shape == (m, 2), f"offsets shape {self.offsets.shape} != ({m}, 2)")
        _check(self.topk_ids.ndim == 2 and len(self.topk_ids) == m, "topk_ids must be [m, k]")
        _check(self.topk_logprobs.shape == self.topk_ids.shape, "topk_logprobs must match topk_ids")
        _check(self.gold_logprobs.shape == (m,), "gold_logprobs must be [m]")

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    def to_bytes(self, float_dtype: str = "f32") -> bytes:
        return codec.encode(
            {
                "token_ids": self.token_ids.astype(np.int32),
                "offsets": self.offsets.astype(np.int32),
                "topk_ids": self.topk_ids.astype(np.int32),
                "topk_logprobs": self.topk_logprobs.astype(codec.DTYPES[float_dtype]),
                "gold_logprobs": self.gold_logprobs.astype(codec.DTYPES[float_dtype]),
            },
            meta={"kind": "scores", "schema": SCORES_SCHEMA, "truncated": self.truncated},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> TeacherScores:
        arrays, meta = codec.decode(data)
        _check(meta.get("kind") == "scores", "not a teacher-scores value")
        _check(meta.get("schema") == SCORES_SCHEMA, f"scores schema {meta.get('schema')}")
        try:
            return cls(
                token_ids=arrays["token_ids"].astype(np.int32),
                offsets=arrays["offsets"].astype(np.int32),
                topk_ids=arrays["topk_ids"].astype(np.int32),
                topk_logprobs=arrays["topk_logprobs"].astype(np.float32),
                gold_logprobs=arrays["gold_logprobs"].astype(np.float32),
                truncated=bool(meta.get("truncated", False)),
            )
        except KeyError as exc:
            raise codec.CodecError(f"missing array {exc}") from exc


@dataclass(frozen=True)
class FusedBlock:
    """The fused target for one block of n target tokens from K teachers.

    target_ids: [n] int32; ids: [n, width] int32 (-1 pad) and probs: [n, width] float32 fused
    sparse distributions (row i predicts target token i+1); tail: [n] float32 the probability
    mass of row i that is on no listed id (probs[i].sum() + tail[i] is 1 for a row with a
    distribution, 0 for an empty row; 0 where the method renormalises its top-k); chosen: [n]
    int16 teacher index (-1 averaged or none); ce: [K] float32 block cross-entropy per teacher;
    coverage: [K] float32 fraction of labelled positions aligned per teacher; teachers: the K
    teacher names.
    """

    target_ids: np.ndarray
    ids: np.ndarray
    probs: np.ndarray
    chosen: np.ndarray
    ce: np.ndarray
    coverage: np.ndarray
    teachers: tuple[str, ...] = field(default_factory=tuple)
    cache_hit: bool = False
    tail: np.ndarray | None = None  # None: no tail (zeros)

    def __post_init__(self) -> None:
        n = len(self.target_ids)
        _check(self.ids.ndim == 2 and len(self.ids) == n, "ids must be [n, width]")
        _check(self.probs.shape == self.ids.shape, "probs must match ids")
        tail = np.zeros(n, dtype=np.float32) if self.tail is None else self.tail
        object.__setattr__(self, "tail", tail)
        _check(tail.shape == (n,), "tail must be [n]")
        _check(self.chosen.shape == (n,), "chosen must be [n]")
        _check(self.ce.shape == self.coverage.shape == (len(self.teachers),), "ce/coverage: [K]")

    @property
    def tail_mass(self) -> np.ndarray:
        """``tail`` typed as the array it always is once built (``__post_init__`` fills None)."""
        if self.tail is None:
            raise AssertionError("FusedBlock.tail is filled in __post_init__")
        return self.tail

    def to_bytes(self, float_dtype: str = "f32") -> bytes:
        return codec.encode(
            {
                "target_ids": self.target_ids.astype(np.int32),
                "ids": self.ids.astype(np.int32),
                "probs": self.probs.astype(codec.DTYPES[float_dtype]),
                "tail": self.tail_mass.astype(codec.DTYPES[float_dtype]),
                "chosen": self.chosen.astype(np.int16),
                "ce": self.ce.astype(np.float32),
                "coverage": self.coverage.astype(np.float32),
            },
            meta={"kind": "fused", "schema": FUSED_SCHEMA, "teachers": list(self.teachers)},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> FusedBlock:
        arrays, meta = codec.decode(data)
        _check(meta.get("kind") == "fused", "not a fused-block value")
        _check(
            meta.get("schema") == FUSED_SCHEMA,
            f"fused block schema {meta.get('schema')} is not supported (this side speaks schema "
            f"{FUSED_SCHEMA}: rows with tail mass); upgrade the older side",
        )
        try:
            return cls(
                target_ids=arrays["target_ids"].astype(np.int32),
                ids=arrays["ids"].astype(np.int32),
                probs=arrays["probs"].astype(np.float32),
                tail=arrays["tail"].astype(np.float32),
                chosen=arrays["chosen"].astype(np.int16),
                ce=arrays["ce"].astype(np.float32),
                coverage=arrays["coverage"].astype(np.float32),
                teachers=tuple(meta.get("teachers", ())),
            )
        except KeyError as exc:
            raise codec.CodecError(f"missing array {exc}") from exc
