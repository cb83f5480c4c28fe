"""Alignment and fusion options, with the two presets: ``default`` and ``fusellm`` (compat).

Covers: one validated, immutable options object naming every choice the core makes, and the
presets. ``default`` is fuseserve's principled setting (offsets alignment anchored on the predicted
token, soft MinED vocabulary on canonical surfaces, duplicates add their mass, MinCE per block,
T = 1). ``spans`` gives every target position a teacher distribution (byte conditioning,
first-token projection, the chain rule for the actual next token, tail mass kept; see
``spans``). ``fusellm`` reproduces the original FuseLLM code: DTW with its tie-breaking and
one-to-one rule, anchored on the input token (its off-by-one), marker-swap MinED vocabulary,
first duplicate kept, MinCE per block.

Leaves out: service settings (addresses, k, limits).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fuseserve.aligner.alignment import AlignMethod, Anchor
from fuseserve.aligner.fusion import FusionLevel, FusionMethod
from fuseserve.aligner.projection import DuplicateRule, Fallback
from fuseserve.aligner.vocabmap import StringMode


class VocabAlign(StrEnum):
    HARD = "hard"  # EM only
    SOFT = "soft"  # EM, then MinED
    COOC = "cooc"  # EM, then the most frequent co-aligned target token in a corpus, then MinED


class FusionOptions(BaseModel):
    """Every alignment/fusion choice. Unknown fields and bad values are rejected by name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alignment: AlignMethod = AlignMethod.OFFSETS
    anchor: Anchor = Anchor.NEXT
    vocab: VocabAlign = VocabAlign.SOFT
    strings: StringMode = StringMode.SURFACE
    duplicates: DuplicateRule = DuplicateRule.SUM
    fallback: Fallback = Fallback.ONEHOT
    method: FusionMethod = FusionMethod.MIN_CE
    level: FusionLevel = FusionLevel.SEQUENCE
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    dtw_compat: bool = False
    tail: bool = True  # spans only: keep the mass outside the top-k as the row's tail

    @model_validator(mode="after")
    def _consistent(self) -> FusionOptions:
        if self.alignment is AlignMethod.OFFSETS and self.anchor is Anchor.INPUT:
            raise ValueError(
                "anchor='input' only exists for alignment='dtw' (the original code's pairing); "
                "offsets alignment pairs contexts and always predicts the next token"
            )
        if self.dtw_compat and self.alignment is not AlignMethod.DTW:
            raise ValueError("dtw_compat=True needs alignment='dtw'")
        if self.vocab is VocabAlign.COOC and self.strings is not StringMode.SURFACE:
            raise ValueError("vocab='cooc' re-ranks the `surface` map: strings must be 'surface'")
        if self.alignment is AlignMethod.SPANS:
            if self.strings is not StringMode.SURFACE:
                raise ValueError("alignment='spans' projects surfaces: strings must be 'surface'")
            if self.temperature != 1.0:
                raise ValueError(
                    "temperature: alignment='spans' keeps the teacher's probabilities with their "
                    "tail mass, so it needs temperature=1"
                )
        return self

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FusionOptions:
        """``default`` or ``fusellm``, with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def cache_key(self) -> str:
        """A canonical string of every option, for content-addressed cache keys (with the
        version of the ``spans`` rows when they are used, so rows built by an older version are
        never reused)."""
        key = self.model_dump_json()
        return f"{key}|spans-v{SPANS_VERSION}" if self.alignment is AlignMethod.SPANS else key


# 2: a byte-level teacher's runs of spaces are projected with the space and word that follow them
# (``continuation.RUN_FOLLOWER``; issue #25, item 5)
# 3: the gold's mass goes to the target's actual next token when that token ends inside the gold;
# in byte-conditioned rows, candidates that end exactly at the bytes read are tail, not dropped
SPANS_VERSION = 3

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "spans": {"alignment": AlignMethod.SPANS},
    "fusellm": {
        "alignment": AlignMethod.DTW,
        "dtw_compat": True,
        "anchor": Anchor.INPUT,
        "vocab": VocabAlign.SOFT,
        "strings": StringMode.FUSELLM,
        "duplicates": DuplicateRule.FIRST,
        "fallback": Fallback.ONEHOT,
        "method": FusionMethod.MIN_CE,
        "level": FusionLevel.SEQUENCE,
    },
}
