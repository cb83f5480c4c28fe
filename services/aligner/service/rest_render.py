"""The answer of ``POST /v1/fuse`` in the format the caller accepts: JSON or the binary reply.

Covers content negotiation (``negotiate``: an ``Accept`` header -> ``"json"``, ``"binary"`` or
None for neither), cutting each block to the requested position range and top-n
(``wire.rows.select_rows``, shared with the client) and rendering: the ``FuseResponse`` JSON
(token strings, covered text, chosen teacher per position) or ``wire.fuse_reply`` bytes. Pure and
CPU-bound: the adapter calls ``render`` in a worker thread.

Leaves out: HTTP (``rest``), the request schema (``rest_schema``) and the work (``dataplane``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fuseserve.aligner.service.dataplane import BlockResult, FuseAnswer
from fuseserve.wire.fuse_reply import MEDIA_TYPE, FuseReply, ReplyBlock, encode_reply
from fuseserve.wire.rows import row_range, select_rows

JSON = "application/json"
OFFERED = {JSON: "json", MEDIA_TYPE: "binary"}
WILDCARDS = {"*/*": "json", "application/*": "json"}


def is_json(content_type: str | None) -> bool:
    """Whether a request's Content-Type is JSON (``application/json`` or ``*/*+json``, any
    parameters); a request without one is read as JSON."""
    if content_type is None:
        return True
    media = content_type.split(";")[0].strip().lower()
    suffixed = media.startswith("application/") and media.endswith("+json")
    return media == "application/json" or suffixed


def negotiate(accept: str | None) -> str | None:
    """The format to answer in: the acceptable offer of highest quality (ties and wildcards
    go to JSON, the default; no header: JSON); None when the header accepts neither."""
    if not accept or not accept.strip():
        return "json"
    best, best_q = None, 0.0
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = OFFERED.get(media.lower()) or WILDCARDS.get(media.lower())
        if kind is None or q <= 0:
            continue
        if q > best_q or (q == best_q and kind == "json"):
            best, best_q = kind, q
    return best


@dataclass(frozen=True)
class Cut:
    """What of each block the caller asked for: positions ``[start, end)``, ``top`` per row
    (None: every entry)."""

    top: int | None
    start: int = 0
    end: int | None = None


def block_json(index: int, result: BlockResult, tokens: Sequence[str], cut: Cut) -> dict:
    """One block as the ``Block`` schema, built with whole-array operations (2048 positions)."""
    full = result.block
    lo, hi = row_range(len(full.target_ids), cut.start, cut.end)
    block = select_rows(full, cut.top, lo, hi)
    names = block.teachers
    top_ids, top_p = block.ids.tolist(), block.probs.tolist()
    chosen = [names[c] if 0 <= c < len(names) else None for c in block.chosen.tolist()]
    tails = block.tail_mass.tolist()
    text = result.text
    positions = [
        {
            "position": lo + i,
            "id": tid,
            "token": tokens[tid],
            "text": text[s:e],
            "chosen": chosen[i],
            "candidates": [
                {"id": c, "token": tokens[c], "prob": p}
                for c, p in zip(top_ids[i], top_p[i])
                if c >= 0
            ],
            "tail": tails[i],
        }
        for i, (tid, (s, e)) in enumerate(
            zip(block.target_ids.tolist(), result.offsets[lo:hi].tolist())
        )
    ]
    teachers = [
        {"name": n, "ce": c if math.isfinite(c) else None, "coverage": v}
        for n, c, v in zip(names, block.ce.tolist(), block.coverage.tolist())
    ]
    return {
        "index": index,
        "start": lo,
        "cache_hit": result.cache_hit,
        "teachers": teachers,
        "positions": positions,
    }


def header(answer: FuseAnswer, target_tokenizer: str) -> dict[str, Any]:
    """Everything an answer shows besides the blocks."""
    return {
        "target_tokenizer": target_tokenizer,
        "target_fingerprint": answer.target_fingerprint,
        "k": answer.k,
        "options": answer.options.model_dump(mode="json"),
    }


def render(
    kind: str,
    answer: FuseAnswer,
    target_tokenizer: str,
    tokens: Sequence[str],
    cut: Cut,
    float_dtype: str = "f16",
) -> bytes:
    """The body for ``kind`` ("json" or "binary"); ``float_dtype`` applies to binary only."""
    results = answer.blocks
    if kind == "binary":
        blocks = []
        for i, r in enumerate(results):
            lo, hi = row_range(len(r.block.target_ids), cut.start, cut.end)
            blocks.append(ReplyBlock(i, lo, r.cache_hit, select_rows(r.block, cut.top, lo, hi)))
        reply = FuseReply(tuple(blocks), **header(answer, target_tokenizer))
        return encode_reply(reply, float_dtype)
    document = {
        **header(answer, target_tokenizer),
        "blocks": [block_json(i, r, tokens, cut) for i, r in enumerate(results)],
    }
    return json.dumps(document, ensure_ascii=False, allow_nan=False).encode()
