"""An asyncio client of the teacher service, with a deadline on every call.

Covers Info, the full vocabulary (reassembled from chunks) and Score (replies decoded into
``TeacherScores``, in request order). gRPC errors propagate as ``grpc.aio.AioRpcError``.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseserve.wire.grpc_guard import aio_channel, auth_metadata
from fuseserve.wire.grpc_service import channel_options
from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.v1 import teacher_pb2, teacher_pb2_grpc

DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


class TeacherClient:
    def __init__(
        self,
        address: str,
        timeout_s: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        """``credentials``: TLS (``grpc_guard.channel_credentials``; None: plaintext);
        ``api_key``: sent as ``authorization: Bearer`` on every call."""
        self.address = address
        self.timeout_s = timeout_s
        self.channel = aio_channel(address, credentials, channel_options(max_message_bytes))
        self.metadata = auth_metadata(api_key)
        self.stub = teacher_pb2_grpc.TeacherStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.serving = True  # as last seen by ``health``

    async def info(self) -> teacher_pb2.InfoReply:
        return await self.stub.Info(
            teacher_pb2.InfoRequest(), timeout=self.timeout_s, metadata=self.metadata
        )

    async def vocab(self) -> list[str]:
        tokens: list[str] = []
        async for chunk in self.stub.Vocab(
            teacher_pb2.VocabRequest(), timeout=self.timeout_s, metadata=self.metadata
        ):
            if chunk.start_id != len(tokens):
                raise RuntimeError(f"vocab chunk out of order at {chunk.start_id}")
            tokens.extend(chunk.tokens)
        return tokens

    async def score(
        self,
        texts: list[str],
        k: int,
        truncate: bool = False,
        add_bos: bool | None = None,
        float_dtype: str = "f32",
    ) -> list[TeacherScores]:
        request = teacher_pb2.ScoreRequest(
            texts=texts,
            k=k,
            too_long=teacher_pb2.TOO_LONG_TRUNCATE if truncate else teacher_pb2.TOO_LONG_REJECT,
            add_bos={None: 0, True: 1, False: 2}[add_bos],
            float_dtype=float_dtype,
        )
        out: list[TeacherScores | None] = [None] * len(texts)
        async for reply in self.stub.Score(request, timeout=self.timeout_s, metadata=self.metadata):
            out[reply.index] = TeacherScores.from_bytes(reply.scores)
        if any(s is None for s in out):
            raise RuntimeError("teacher closed the stream before answering every text")
        return out  # type: ignore[return-value]

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
