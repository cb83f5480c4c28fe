"""What a scoring backend is: tokenise with offsets, then score token sequences with top-k.

Covers the ``ScoringBackend`` protocol every backend implements (``hf`` in-process, ``vllm`` and
``tgi`` remote), the ``TokenizedText`` it scores and the ``BackendInfo`` it reports.

Leaves out: batching across requests (``batcher``) and transport (``server``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fuseserve.teacher.errors import InvalidRequest
from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.tokenizer import TokenizerIdentity


@dataclass(frozen=True)
class BackendInfo:
    model_id: str
    revision: str
    architecture: str
    max_sequence_length: int
    max_k: int
    dtype: str
    device: str
    backend: str


@dataclass(frozen=True)
class TokenizedText:
    """ids: [m] token ids; offsets: [m, 2] character offsets; truncated: cut to the max length.

    text: the characters the ids cover (the input, cut at the last kept token when truncated);
    remote backends that tokenise on the server (TGI) send this.
    """

    ids: np.ndarray
    offsets: np.ndarray
    truncated: bool = False
    text: str = ""


class ScoringBackend(Protocol):
    info: BackendInfo
    view: TokenizerIdentity

    def tokenize(
        self, text: str, add_bos: bool | None, truncate: bool = False, field: str = "texts"
    ) -> TokenizedText: ...

    def score(self, batch: list[TokenizedText], k: int) -> list[TeacherScores]:
        """Score sequences (blocking; called from a worker thread)."""
        ...


class LocalTokenizer:
    """Mixin for backends that tokenise in this process: needs ``tokenizer`` and ``info``."""

    tokenizer: object
    info: BackendInfo

    def tokenize(
        self, text: str, add_bos: bool | None, truncate: bool = False, field: str = "texts"
    ) -> TokenizedText:
        return tokenize_with_offsets(
            self.tokenizer, text, add_bos, self.info.max_sequence_length, truncate, field
        )


def tokenize_with_offsets(
    tokenizer, text: str, add_bos: bool | None, max_length: int, truncate: bool, field: str
) -> TokenizedText:
    """Tokenise ``text`` with character offsets, BOS by policy (None = the tokenizer's default).

    Raises InvalidRequest naming ``field`` when the text is too long and ``truncate`` is off.
    """
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        default = tokenizer("a", add_special_tokens=True)["input_ids"]
        add_bos = bos is not None and len(default) > 0 and default[0] == bos
    if add_bos and bos is not None:
        ids = [bos, *ids]
        offsets = [(0, 0), *offsets]
    truncated = False
    if len(ids) > max_length:
        if not truncate:
            raise InvalidRequest(
                field, f"{len(ids)} tokens exceed max_sequence_length={max_length}"
            )
        ids, offsets, truncated = ids[:max_length], offsets[:max_length], True
        text = text[: max(end for _, end in offsets)]
    if len(ids) < 2:
        raise InvalidRequest(field, "needs at least 2 tokens to score a next-token prediction")
    return TokenizedText(
        ids=np.asarray(ids, dtype=np.int64),
        offsets=np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
        truncated=truncated,
        text=text,
    )
