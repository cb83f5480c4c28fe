"""Protobuf <-> domain values, for every fuseserve gRPC message: the one place that knows both.

Covers the teacher's messages (Info <-> ``TeacherInfo``, the vocabulary in chunks, Score requests
<-> ``ScoreQuery``, Score replies <-> ``TeacherScores``) and the aligner's (a teacher's status ->
its ``TeacherInfo`` message, Fuse requests <-> ``FuseCall``, fused blocks <-> ``FusedBlock``).
Fields a message cannot carry as they are (an unknown enum value, options that are not a JSON
object, a float width other than f16/f32) raise ``InvalidRequest`` naming the field.

Leaves out: validation of values against a service's limits (each service), and transport.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

from fuseserve.errors import InvalidRequest
from fuseserve.wire.descriptions import ROLES, TeacherInfo, TeacherStatus
from fuseserve.wire.messages import FusedBlock, TeacherScores
from fuseserve.wire.requests import FuseCall, ScoreQuery
from fuseserve.wire.v1 import aligner_pb2, teacher_pb2

FLOAT_DTYPES = ("f16", "f32")
_ADD_BOS = {0: None, 1: True, 2: False}  # AddBos: AUTO, ALWAYS, NEVER
_ADD_BOS_PB = {
    None: teacher_pb2.ADD_BOS_AUTO,
    True: teacher_pb2.ADD_BOS_ALWAYS,
    False: teacher_pb2.ADD_BOS_NEVER,
}


def float_dtype_from_pb(value: str) -> str:
    """A message's float width ("" means f32)."""
    if value not in ("", *FLOAT_DTYPES):
        raise InvalidRequest("float_dtype", f"must be 'f16' or 'f32', got {value!r}")
    return value or "f32"


# ---------------------------------------------------------------------- teacher
def teacher_info_to_pb(info: TeacherInfo) -> teacher_pb2.InfoReply:
    fields = dataclasses.asdict(info)
    for role in ROLES:  # no such token: -1 on the wire
        fields[role] = -1 if fields[role] is None else fields[role]
    fields["special_ids"] = list(info.special_ids)
    return teacher_pb2.InfoReply(**fields)


def teacher_info_from_pb(reply: teacher_pb2.InfoReply) -> TeacherInfo:
    fields = {f.name: getattr(reply, f.name) for f in dataclasses.fields(TeacherInfo)}
    for role in ROLES:
        fields[role] = None if fields[role] < 0 else fields[role]
    fields["special_ids"] = tuple(reply.special_ids)
    return TeacherInfo(**fields)


def vocab_chunks_to_pb(tokens: tuple[str, ...], size: int) -> Iterator[teacher_pb2.VocabChunk]:
    for start in range(0, len(tokens), size):
        yield teacher_pb2.VocabChunk(
            start_id=start, tokens=tokens[start : start + size], vocab_size=len(tokens)
        )


def vocab_extend(tokens: list[str], chunk: teacher_pb2.VocabChunk) -> None:
    """Append one chunk's tokens to the vocabulary read so far (chunks come in order)."""
    if chunk.start_id != len(tokens):
        raise RuntimeError(f"vocab chunk out of order at {chunk.start_id}")
    tokens.extend(chunk.tokens)


def score_query_to_pb(query: ScoreQuery) -> teacher_pb2.ScoreRequest:
    return teacher_pb2.ScoreRequest(
        texts=list(query.texts),
        k=query.k,
        too_long=teacher_pb2.TOO_LONG_TRUNCATE if query.truncate else teacher_pb2.TOO_LONG_REJECT,
        add_bos=_ADD_BOS_PB[query.add_bos],
        float_dtype=query.float_dtype,
    )


def score_query_from_pb(request: teacher_pb2.ScoreRequest) -> ScoreQuery:
    if request.add_bos not in _ADD_BOS:
        raise InvalidRequest("add_bos", f"unknown value {request.add_bos}")
    return ScoreQuery(
        texts=tuple(request.texts),
        k=request.k,
        truncate=request.too_long == teacher_pb2.TOO_LONG_TRUNCATE,
        add_bos=_ADD_BOS[request.add_bos],
        float_dtype=float_dtype_from_pb(request.float_dtype),
    )


def score_reply_to_pb(index: int, scores: TeacherScores, float_dtype: str):
    return teacher_pb2.ScoreReply(
        index=index,
        scores=scores.to_bytes(float_dtype),
        truncated=scores.truncated,
        num_tokens=len(scores.token_ids),
    )


def scores_from_pb(reply: teacher_pb2.ScoreReply) -> TeacherScores:
    return TeacherScores.from_bytes(reply.scores)


# ---------------------------------------------------------------------- aligner
def teacher_status_to_pb(status: TeacherStatus) -> aligner_pb2.TeacherInfo:
    return aligner_pb2.TeacherInfo(
        name=status.name,
        addresses=list(status.addresses),
        model_id=status.model_id or "",
        tokenizer_fingerprint=status.tokenizer_fingerprint or "",
        vocab_size=status.vocab_size or 0,
        max_k=status.max_k,
        ready=status.ready,
    )


def fuse_call_to_pb(call: FuseCall) -> aligner_pb2.FuseRequest:
    return aligner_pb2.FuseRequest(
        id=call.id,
        texts=list(call.texts),
        k=call.k or 0,
        preset=call.preset or "",
        options_json=json.dumps(call.options) if call.options is not None else "",
        teachers=list(call.teachers or ()),
        float_dtype=call.float_dtype,
        token_ids=[aligner_pb2.TokenIds(ids=list(ids)) for ids in call.token_ids or ()],
    )


def fuse_call_from_pb(request: aligner_pb2.FuseRequest) -> FuseCall:
    float_dtype = float_dtype_from_pb(request.float_dtype)
    options = None
    if request.options_json:
        try:
            options = json.loads(request.options_json)
        except json.JSONDecodeError as exc:
            raise InvalidRequest("options_json", f"not JSON: {exc}") from exc
        if not isinstance(options, dict):
            raise InvalidRequest("options_json", "must be a JSON object")
    return FuseCall(
        id=request.id,
        texts=tuple(request.texts),
        k=request.k or None,
        preset=request.preset or None,
        options=options,
        teachers=tuple(request.teachers) or None,
        float_dtype=float_dtype,
        token_ids=tuple(tuple(row.ids) for row in request.token_ids) or None,
    )


def fused_block_to_pb(
    call_id: str, index: int, block: FusedBlock, float_dtype: str, target_fingerprint: str
) -> aligner_pb2.FusedBlock:
    return aligner_pb2.FusedBlock(
        id=call_id,
        index=index,
        block=block.to_bytes(float_dtype),
        cache_hit=block.cache_hit,
        teachers=list(block.teachers),
        ce=block.ce.tolist(),
        coverage=block.coverage.tolist(),
        target_fingerprint=target_fingerprint,
    )


def fused_block_from_pb(message: aligner_pb2.FusedBlock) -> FusedBlock:
    """The block (``cache_hit`` as the aligner said); the target fingerprint and id are the
    caller's to check."""
    return dataclasses.replace(FusedBlock.from_bytes(message.block), cache_hit=message.cache_hit)
