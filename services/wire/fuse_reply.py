"""The binary answer of ``POST /v1/fuse`` (media type ``application/vnd.fuseserve.fused``).

Covers ``FuseReply`` (the answer to one fuse request, whatever the transport: the blocks, each
with its position offset and cache flag, plus the target and the options used) and its binary
form: one codec value (``codec``) whose meta holds the reply's fields and, per block, ``index``,
``start`` and ``cache_hit``, and whose arrays ``block0``, ``block1``, ... are uint8 arrays, each
holding one ``FusedBlock`` codec value (the same bytes as a gRPC ``FusedBlock.block``).

Size of one block: a fixed part (the two JSON headers, about 1 KB), 8 bytes per position
(target id int32, chosen teacher int16, tail float16) and 6 bytes per (id, probability) slot
(int32 + float16); with float32 probabilities 10 bytes per position and 8 per slot.

Leaves out: HTTP (content negotiation lives in the REST adapter) and choosing rows (``rows``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fuseserve.wire import codec
from fuseserve.wire.messages import FusedBlock

MEDIA_TYPE = "application/vnd.fuseserve.fused"
REPLY_SCHEMA = 1


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
    arrays = {
        f"block{i}": np.frombuffer(b.block.to_bytes(float_dtype), dtype=np.uint8)
        for i, b in enumerate(reply.blocks)
    }
    meta = {
        "kind": "fuse-reply",
        "schema": REPLY_SCHEMA,
        "target_tokenizer": reply.target_tokenizer,
        "target_fingerprint": reply.target_fingerprint,
        "k": reply.k,
        "options": reply.options,
        "blocks": [
            {"index": b.index, "start": b.start, "cache_hit": b.cache_hit} for b in reply.blocks
        ],
    }
    return codec.encode(arrays, meta)


def decode_reply(data: bytes | bytearray | memoryview) -> FuseReply:
    """Inverse of ``encode_reply`` (probabilities come back as float32); ``CodecError`` on
    anything malformed."""
    arrays, meta = codec.decode(data)
    if meta.get("kind") != "fuse-reply" or meta.get("schema") != REPLY_SCHEMA:
        raise codec.CodecError(
            f"not a fuse reply of schema {REPLY_SCHEMA} (kind {meta.get('kind')!r}, "
            f"schema {meta.get('schema')!r})"
        )
    blocks = []
    try:
        for i, spec in enumerate(meta["blocks"]):
            block = FusedBlock.from_bytes(arrays[f"block{i}"].tobytes())
            cache_hit = bool(spec["cache_hit"])
            block = dataclasses.replace(block, cache_hit=cache_hit)
            blocks.append(ReplyBlock(int(spec["index"]), int(spec["start"]), cache_hit, block))
    except (KeyError, TypeError, ValueError) as exc:
        raise codec.CodecError(f"fuse reply: bad block entry ({exc!r})") from exc
    return FuseReply(
        blocks=tuple(blocks),
        target_fingerprint=meta.get("target_fingerprint"),
        target_tokenizer=meta.get("target_tokenizer"),
        k=meta.get("k"),
        options=meta.get("options"),
    )
