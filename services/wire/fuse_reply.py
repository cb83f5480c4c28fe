"""The binary answer of ``POST /v1/fuse`` (media type ``application/vnd.fuseserve.fused``).

Covers ``FuseReply`` (the answer to one fuse request, whatever the transport: the blocks, each
with its position offset and cache flag, plus the target and the options used) and its binary
form: one codec value (``codec``) whose meta holds the reply's fields and, per block, ``index``,
``start``, ``cache_hit`` and the teacher names, and whose arrays are, for block ``i``:

- ``i.target_ids`` [n] int32, ``i.chosen`` [n] int16, ``i.tail`` [n] float16 (or float32),
- ``i.lengths`` [n] uint8 (int16 when a row may list more than 255 entries): entries per row,
- ``i.ids`` [sum(lengths)] int32 and ``i.probs`` [sum(lengths)] float16 (or float32): the listed
  (id, probability) entries of all rows back to back, row by row (padding is not sent),
- ``i.ce``, ``i.coverage`` [K] float32.

Size of one block: a fixed part (the JSON header, about 0.5 KB per block), 9 bytes per position
(11 with float32) and 6 bytes per listed (id, probability) entry (8 with float32).

Leaves out: HTTP (content negotiation lives in the REST adapter) and choosing rows (``rows``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fuseserve.wire import codec
from fuseserve.wire.messages import FusedBlock

MEDIA_TYPE = "application/vnd.fuseserve.fused"
REPLY_SCHEMA = 2  # 2: rows ragged (listed entries only)


@dataclass(frozen=True)
class ReplyBlock:
    """One answered block: ``block`` holds rows ``[start, start + len(block.target_ids))`` of
    the text's full fused block."""

    index: int
    start: int
    cache_hit: bool
    block: FusedBlock


@dataclass(frozen=True)
class FuseReply:
    """An answer to one fuse request. ``target_tokenizer``, ``k`` and ``options`` are None where
    the transport does not carry them (a gRPC reply)."""

    blocks: tuple[ReplyBlock, ...]
    target_fingerprint: str | None = None
    target_tokenizer: str | None = None
    k: int | None = None
    options: dict[str, Any] | None = field(default=None)


def encode_reply(reply: FuseReply, float_dtype: str = "f16") -> bytes:
    """The binary body; probabilities and tails as ``float_dtype`` ("f16" or "f32")."""
    arrays: dict[str, np.ndarray] = {}
    for i, b in enumerate(reply.blocks):
        arrays.update(_ragged(f"{i}.", b.block, codec.DTYPES[float_dtype]))
    meta = {
        "kind": "fuse-reply",
        "schema": REPLY_SCHEMA,
        "target_tokenizer": reply.target_tokenizer,
        "target_fingerprint": reply.target_fingerprint,
        "k": reply.k,
        "options": reply.options,
        "blocks": [
            {
                "index": b.index,
                "start": b.start,
                "cache_hit": b.cache_hit,
                "teachers": list(b.block.teachers),
            }
            for b in reply.blocks
        ],
    }
    return codec.encode(arrays, meta)


def _ragged(prefix: str, block: FusedBlock, float_dtype: np.dtype) -> dict[str, np.ndarray]:
    """One block's arrays with each row's listed entries only (padding, id -1, dropped)."""
    listed = block.ids >= 0
    lengths = listed.sum(axis=1)
    return {
        prefix + "target_ids": block.target_ids.astype(np.int32),
        prefix + "chosen": block.chosen.astype(np.int16),
        prefix + "tail": block.tail_mass.astype(float_dtype),
        prefix + "lengths": lengths.astype(np.uint8 if block.ids.shape[1] <= 255 else np.int16),
        prefix + "ids": block.ids[listed].astype(np.int32),
        prefix + "probs": block.probs[listed].astype(float_dtype),
        prefix + "ce": block.ce.astype(np.float32),
        prefix + "coverage": block.coverage.astype(np.float32),
    }


def _padded(prefix: str, arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> FusedBlock:
    """Inverse of ``_ragged``: rows padded (id -1, probability 0) to the longest row."""
    lengths = arrays[prefix + "lengths"].astype(np.int64)
    ids, probs = arrays[prefix + "ids"], arrays[prefix + "probs"]
    n = len(lengths)
    consistent = len(ids) == len(probs) == int(lengths.sum()) and not (lengths < 0).any()
    if len(arrays[prefix + "target_ids"]) != n or not consistent:
        raise codec.CodecError(f"fuse reply: block {prefix[:-1]} has inconsistent lengths")
    width = int(lengths.max()) if n else 0
    column = np.arange(width)[None, :] < lengths[:, None]  # [n, width]: slot is listed
    dense_ids = np.full((n, width), -1, dtype=np.int32)
    dense_p = np.zeros((n, width), dtype=np.float32)
    dense_ids[column] = ids
    dense_p[column] = probs
    return FusedBlock(
        target_ids=arrays[prefix + "target_ids"].astype(np.int32),
        ids=dense_ids,
        probs=dense_p,
        tail=arrays[prefix + "tail"].astype(np.float32),
        chosen=arrays[prefix + "chosen"].astype(np.int16),
        ce=arrays[prefix + "ce"].astype(np.float32),
        coverage=arrays[prefix + "coverage"].astype(np.float32),
        teachers=tuple(spec["teachers"]),
        cache_hit=bool(spec["cache_hit"]),
    )


def decode_reply(data: bytes | bytearray | memoryview) -> FuseReply:
    """Inverse of ``encode_reply`` (probabilities come back as float32, rows padded with id -1
    to the longest row of their block); ``CodecError`` on anything malformed."""
    arrays, meta = codec.decode(data)
    if meta.get("kind") != "fuse-reply" or meta.get("schema") != REPLY_SCHEMA:
        raise codec.CodecError(
            f"not a fuse reply of schema {REPLY_SCHEMA} (kind {meta.get('kind')!r}, "
            f"schema {meta.get('schema')!r})"
        )
    blocks = []
    try:
        for i, spec in enumerate(meta["blocks"]):
            block = _padded(f"{i}.", arrays, spec)
            blocks.append(
                ReplyBlock(int(spec["index"]), int(spec["start"]), block.cache_hit, block)
            )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, codec.CodecError):
            raise
        raise codec.CodecError(f"fuse reply: bad block entry ({exc!r})") from exc
    return FuseReply(
        blocks=tuple(blocks),
        target_fingerprint=meta.get("target_fingerprint"),
        target_tokenizer=meta.get("target_tokenizer"),
        k=meta.get("k"),
        options=meta.get("options"),
    )
