"""The aligner's gRPC API (fuseserve.aligner.v1): Info, Fuse, FuseStream; health; reflection.

Covers calling ``FusionService`` for each request and FuseStream's flow control: a reader task
admits at most ``max_stream_inflight`` requests of one stream at a time (it stops reading when the
caller stops consuming), and replies go out in request order; an error in a stream names the
request it concerns.

Leaves out: the work itself and the request metrics (``dataplane``), protobuf conversion
(``fuseserve.wire.convert``) and the error -> status mapping (``fuseserve.wire.status``'s
``ErrorStatus``, installed on the server).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from fuseserve.aligner.service.dataplane import FusionService
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.errors import ServiceError
from fuseserve.wire import convert
from fuseserve.wire.grpc_server import Health, start_server
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = aligner_pb2.DESCRIPTOR.services_by_name["Aligner"].full_name


class AlignerServicer(aligner_pb2_grpc.AlignerServicer):
    def __init__(
        self,
        service: FusionService,
        metrics: AlignerMetrics,
        target_name: str,
        max_stream_inflight: int = 8,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.target_name = target_name
        self.max_stream_inflight = max_stream_inflight

    async def _answer(self, request, streamed: bool = False) -> list[aligner_pb2.FusedBlock]:
        call = convert.fuse_call_from_pb(request)
        answer = await self.service.answer(call, "grpc", streamed)
        fp = answer.target_fingerprint
        return [
            convert.fused_block_to_pb(call.id, i, r.block, call.float_dtype, fp)
            for i, r in enumerate(answer.blocks)
        ]

    async def Info(self, request, context):
        svc = self.service
        return aligner_pb2.InfoReply(
            target_tokenizer=self.target_name,
            target_fingerprint=svc.target.fingerprint,
            target_vocab_size=svc.target.vocab_size,
            teachers=[convert.teacher_status_to_pb(s) for s in svc.teacher_statuses()],
            default_k=svc.settings.k,
            default_options_json=svc.query_options_json(),
            max_block_tokens=svc.settings.max_block_tokens,
            max_texts=svc.settings.max_texts,
        )

    async def Fuse(self, request, context):
        return aligner_pb2.FuseReply(blocks=await self._answer(request))

    async def FuseStream(self, request_iterator, context) -> AsyncIterator[aligner_pb2.FusedBlock]:
        pending: asyncio.Queue = asyncio.Queue(maxsize=self.max_stream_inflight)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._answer(request, streamed=True))
                    await pending.put((request.id, task))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            async for block in self._stream_replies(pending, reader):
                yield block
        finally:  # the caller cancelled, or its deadline passed: each request in flight counts
            reader.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if item is not None:
                    item[1].cancel()

    async def _stream_replies(
        self, pending: asyncio.Queue, reader: asyncio.Future
    ) -> AsyncIterator[aligner_pb2.FusedBlock]:
        """Each admitted request's blocks, in request order, until the caller stops sending."""
        while True:
            item = await pending.get()
            if item is None:
                break
            request_id, task = item
            try:
                blocks = await task
            except ServiceError as exc:
                raise exc.prefixed(f"request {request_id!r}: ") from exc
            for block in blocks:
                yield block
        await reader  # surfaces a failed read (e.g. the caller cancelled)


async def start_grpc(
    servicer: AlignerServicer,
    host: str,
    port: int,
    max_message_bytes: int,
    api_key: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int, Health]:
    """Start the aligner's gRPC server (health NOT_SERVING until ``Health.set_serving``);
    ``api_key``: every call but health needs it; ``credentials``: TLS."""
    requests = servicer.metrics.requests
    running = await start_server(
        SERVICE, aligner_pb2_grpc.add_AlignerServicer_to_server, servicer, f"{host}:{port}",
        max_message_bytes, api_key, credentials,
        on_error=lambda exc: requests.labels("grpc", type(exc).__name__).inc(),
    )  # fmt: skip
    return running.server, running.port, running.health
