"""What a client asks of the aligner, and the errors it gets back, whatever the transport.

Covers ``FuseParams`` (the fusion choices: k, preset, option overrides, teacher subset, and the
cut: top-n per row and a position range, plus the binary probability dtype), turning them into a
REST JSON body or a gRPC ``FuseRequest``, turning a REST JSON answer into the same ``FuseReply``
(arrays) the binary and gRPC answers give, and ``FuseError``. Pure: no I/O.

Leaves out: the transports (``rest``, ``grpc_client``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fuseserve.wire import convert
from fuseserve.wire.fuse_reply import FuseReply, ReplyBlock
from fuseserve.wire.messages import FusedBlock
from fuseserve.wire.requests import FuseCall
from fuseserve.wire.rows import compact, row_range, select_rows
from fuseserve.wire.v1 import aligner_pb2


class FuseError(RuntimeError):
    """The aligner refused or failed a request. ``status``: the HTTP status (int) or the gRPC
    status code name; ``kind``: the error type (REST envelope) or code name; ``field``: the
    request field at fault when the service names one; ``retry_after_s`` on overload."""

    def __init__(self, status, kind: str, message: str, field=None, retry_after_s=None) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s


def call_texts(texts, token_ids) -> list[str]:
    """The texts of a fuse call that gives exactly one of ``texts`` and ``token_ids``."""
    if (texts is None) == (token_ids is None):
        raise ValueError("give exactly one of texts and token_ids")
    if texts is None:
        return []
    return [texts] if isinstance(texts, str) else list(texts)


@dataclass(frozen=True)
class FuseParams:
    """Fusion choices (None / empty: the service's defaults) and the cut of each block: rows
    ``[start, end)``, ``top`` entries per row (None: all). ``float_dtype``: probabilities on the
    wire for the binary and gRPC answers ("f16" halves them; JSON always carries float32)."""

    k: int | None = None
    preset: str | None = None
    options: Mapping[str, Any] | str | None = None  # a dict or a JSON object as text
    teachers: Sequence[str] = ()
    top: int | None = None
    start: int = 0
    end: int | None = None
    float_dtype: str = "f16"

    def options_dict(self) -> dict[str, Any] | None:
        if self.options is None or self.options == "":
            return None
        return json.loads(self.options) if isinstance(self.options, str) else dict(self.options)

    def rest_body(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]] | None = None
    ) -> dict[str, Any]:
        """The JSON body for ``texts``, or for target ``token_ids`` (one list per block)."""
        body = {
            "texts": None if token_ids is not None else list(texts),
            "token_ids": None if token_ids is None else [list(map(int, r)) for r in token_ids],
            "k": self.k,
            "preset": self.preset,
            "options": self.options_dict(),
            "teachers": list(self.teachers) or None,
            "top": self.top,
            "start": self.start,
            "end": self.end,
            "float_dtype": self.float_dtype,
        }
        return {key: value for key, value in body.items() if value is not None or key == "top"}

    def grpc_request(
        self,
        request_id: str,
        texts: Sequence[str],
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> aligner_pb2.FuseRequest:
        """The ``FuseRequest`` for ``texts``, or for target ``token_ids`` (one list per block)."""
        call = FuseCall(
            id=request_id,
            texts=tuple(texts),
            token_ids=None if token_ids is None else tuple(tuple(map(int, r)) for r in token_ids),
            k=self.k,
            preset=self.preset,
            options=self.options_dict(),
            teachers=tuple(self.teachers) or None,
            float_dtype=self.float_dtype,
        )
        return convert.fuse_call_to_pb(call)

    def cut(self, index: int, block: FusedBlock) -> ReplyBlock:
        """A whole block (as gRPC sends it) cut as the REST server would cut it."""
        lo, hi = row_range(len(block.target_ids), self.start, self.end)
        return ReplyBlock(index, lo, block.cache_hit, compact(select_rows(block, self.top, lo, hi)))


def _row_arrays(positions: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """ids [n, width] int32 (-1 pad) and probs [n, width] float32 from JSON positions."""
    width = max((len(p["candidates"]) for p in positions), default=0)
    ids = np.full((len(positions), width), -1, dtype=np.int32)
    probs = np.zeros((len(positions), width), dtype=np.float32)
    for i, position in enumerate(positions):
        row = position["candidates"]
        ids[i, : len(row)] = [c["id"] for c in row]
        probs[i, : len(row)] = [c["prob"] for c in row]
    return ids, probs


def block_from_json(doc: Mapping[str, Any]) -> ReplyBlock:
    """One JSON ``Block`` as arrays (the shape a binary or gRPC answer has)."""
    positions = doc["positions"]
    names = tuple(t["name"] for t in doc["teachers"])
    ids, probs = _row_arrays(positions)
    ce = [math.nan if t["ce"] is None else t["ce"] for t in doc["teachers"]]
    block = FusedBlock(
        target_ids=np.array([p["id"] for p in positions], dtype=np.int32),
        ids=ids,
        probs=probs,
        chosen=np.array(
            [-1 if p["chosen"] is None else names.index(p["chosen"]) for p in positions],
            dtype=np.int16,
        ),
        ce=np.array(ce, dtype=np.float32),
        coverage=np.array([t["coverage"] for t in doc["teachers"]], dtype=np.float32),
        teachers=names,
        cache_hit=bool(doc["cache_hit"]),
        tail=np.array([p["tail"] for p in positions], dtype=np.float32),
    )
    return ReplyBlock(int(doc["index"]), int(doc["start"]), block.cache_hit, block)


def reply_from_json(doc: Mapping[str, Any]) -> FuseReply:
    return FuseReply(
        blocks=tuple(block_from_json(b) for b in doc["blocks"]),
        target_fingerprint=doc.get("target_fingerprint"),
        target_tokenizer=doc.get("target_tokenizer"),
        k=doc.get("k"),
        options=doc.get("options"),
    )


def compact_reply(reply: FuseReply) -> FuseReply:
    """Every block ``compact``: how the client returns answers of every transport."""
    blocks = tuple(replace(b, block=compact(b.block)) for b in reply.blocks)
    return replace(reply, blocks=blocks)


def rest_error(status: int, headers: Mapping[str, str], body: bytes) -> FuseError:
    """A REST error answer (the ``ErrorEnvelope``, or anything else a proxy may send)."""
    retry = headers.get("retry-after")
    retry_after_s = float(retry) if retry and retry.isdigit() else None
    try:
        error = json.loads(body)["error"]
        return FuseError(status, error["type"], error["message"], error.get("field"), retry_after_s)
    except (ValueError, KeyError, TypeError):
        return FuseError(status, "HTTPError", body[:200].decode("utf-8", "replace"))
