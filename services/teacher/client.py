"""An asyncio client of the teacher service, with a deadline on every call.

Covers Info (a ``TeacherInfo``), the full vocabulary (reassembled from chunks) and Score (replies
decoded into ``TeacherScores``, in request order). A call the teacher refuses raises the shared
error it stands for (``fuseserve.wire.status.error_from_rpc``: ``InvalidRequest``, ``Overloaded``,
``DeadlineExceeded``, ``Unavailable``, else ``ServiceError``), with ``remote_status`` set.

Leaves out: retries and replicas (the caller's, e.g. the aligner's pool).
"""

from __future__ import annotations

import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseserve.wire import convert
from fuseserve.wire.descriptions import TeacherInfo
from fuseserve.wire.grpc_channel import aio_channel, auth_metadata, channel_options
from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.requests import ScoreQuery
from fuseserve.wire.status import error_from_rpc
from fuseserve.wire.v1 import teacher_pb2, teacher_pb2_grpc

DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


@contextlib.contextmanager
def _translated():
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from exc


class TeacherClient:
    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        """``credentials``: TLS (``grpc_channel.channel_credentials``; None: plaintext);
        ``api_key``: sent as ``authorization: Bearer`` on every call."""
        self.address = address
        self.timeout_s = timeout_s
        self.channel = aio_channel(address, credentials, channel_options(max_message_bytes))
        self.metadata = auth_metadata(api_key)
        self.stub = teacher_pb2_grpc.TeacherStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.serving = True  # as last seen by ``health``

    async def info(self) -> TeacherInfo:
        with _translated():
            reply = await self.stub.Info(
                teacher_pb2.InfoRequest(), timeout=self.timeout_s, metadata=self.metadata
            )
        return convert.teacher_info_from_pb(reply)

    async def vocab(self) -> list[str]:
        tokens: list[str] = []
        with _translated():
            async for chunk in self.stub.Vocab(
                teacher_pb2.VocabRequest(), timeout=self.timeout_s, metadata=self.metadata
            ):
                convert.vocab_extend(tokens, chunk)
        return tokens

    async def score(
        self,
        texts: list[str],
        k: int,
        truncate: bool = False,
        add_bos: bool | None = None,
        float_dtype: str = "f32",
    ) -> list[TeacherScores]:
        request = convert.score_query_to_pb(
            ScoreQuery(tuple(texts), k, truncate, add_bos, float_dtype)
        )
        out: list[TeacherScores | None] = [None] * len(texts)
        with _translated():
            async for reply in self.stub.Score(
                request, timeout=self.timeout_s, metadata=self.metadata
            ):
                out[reply.index] = convert.scores_from_pb(reply)
        answered = [s for s in out if s is not None]
        if len(answered) != len(out):
            raise RuntimeError("teacher closed the stream before answering every text")
        return answered

    async def health(self, timeout_s: float) -> str | None:
        """None when the teacher's grpc.health.v1 status is SERVING, else what it is."""
        try:
            reply = await self.health_stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self.channel.close()
