"""The aligner's gRPC API (fuseserve.aligner.v1): Info, Fuse, FuseStream; health; reflection.

Covers converting requests into ``FusionService`` calls and results into ``FusedBlock`` messages,
the one mapping of the error hierarchy to status codes, and FuseStream's flow control: a reader
task admits at most ``max_stream_inflight`` requests of one stream at a time (it stops reading
when the caller stops consuming), and replies go out in request order.

Leaves out: the work itself (``dataplane``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc

from fuseserve.aligner.service.dataplane import BlockResult, FusionService
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.errors import InvalidRequest, Overloaded, ServiceError, StartupError, Unavailable
from fuseserve.wire.grpc_guard import TokenAuth, add_guarded, add_port
from fuseserve.wire.grpc_service import Health, add_health_and_reflection, new_server
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = aligner_pb2.DESCRIPTOR.services_by_name["Aligner"].full_name
STATUS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: ServiceError) -> grpc.StatusCode:
    return next((c for cls, c in STATUS.items() if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


def trailing_metadata(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    """``retry-after`` (whole seconds, like the REST header) on RESOURCE_EXHAUSTED."""
    if isinstance(exc, Overloaded):
        return (("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),)
    return ()


def block_message(request_id: str, index: int, result: BlockResult, float_dtype: str, target_fp):
    block = result.block
    return aligner_pb2.FusedBlock(
        id=request_id,
        index=index,
        block=block.to_bytes(float_dtype),
        cache_hit=result.cache_hit,
        teachers=list(block.teachers),
        ce=block.ce.tolist(),
        coverage=block.coverage.tolist(),
        target_fingerprint=target_fp,
    )


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

    async def _abort(self, context, exc: ServiceError):
        self.metrics.requests.labels("grpc", type(exc).__name__).inc()
        await context.abort(status_of(exc), str(exc), trailing_metadata(exc))

    def _query(self, request):
        if request.float_dtype not in ("", "f16", "f32"):
            raise InvalidRequest(
                "float_dtype", f"must be 'f16' or 'f32', got {request.float_dtype!r}"
            )
        options = None
        if request.options_json:
            try:
                options = json.loads(request.options_json)
            except json.JSONDecodeError as exc:
                raise InvalidRequest("options_json", f"not JSON: {exc}") from exc
            if not isinstance(options, dict):
                raise InvalidRequest("options_json", "must be a JSON object")
        return self.service.query(
            list(request.texts),
            request.k or None,
            request.preset or None,
            options,
            list(request.teachers) or None,
        )

    async def _answer(self, request) -> list[aligner_pb2.FusedBlock]:
        results = await self.service.fuse(self._query(request))
        dtype = request.float_dtype or "f32"
        fp = self.service.target.fingerprint
        return [block_message(request.id, i, r, dtype, fp) for i, r in enumerate(results)]

    async def Info(self, request, context):
        svc = self.service
        return aligner_pb2.InfoReply(
            target_tokenizer=self.target_name,
            target_fingerprint=svc.target.fingerprint,
            target_vocab_size=svc.target.vocab_size,
            teachers=[
                aligner_pb2.TeacherInfo(
                    name=name,
                    addresses=list(t.addresses),
                    model_id=t.info.model_id if t.info else "",
                    tokenizer_fingerprint=t.view.fingerprint if t.view else "",
                    vocab_size=t.view.vocab_size if t.view else 0,
                    max_k=t.max_k,
                    ready=t.ready,
                )
                for name, t in svc.pool.teachers.items()
            ],
            default_k=svc.default_k,
            default_options_json=svc.query_options_json(),
            max_block_tokens=svc.max_block_tokens,
            max_texts=svc.max_texts,
        )

    async def Fuse(self, request, context):
        start = time.perf_counter()
        try:
            blocks = await self._answer(request)
        except ServiceError as exc:
            await self._abort(context, exc)
        self.metrics.requests.labels("grpc", "ok").inc()
        self.metrics.request_latency.labels("grpc").observe(time.perf_counter() - start)
        return aligner_pb2.FuseReply(blocks=blocks)

    async def FuseStream(self, request_iterator, context) -> AsyncIterator[aligner_pb2.FusedBlock]:
        pending: asyncio.Queue = asyncio.Queue(maxsize=self.max_stream_inflight)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(self._answer(request))
                    await pending.put((request.id, task))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await pending.get()
                if item is None:
                    break
                request_id, task = item
                try:
                    blocks = await task
                except ServiceError as exc:
                    self.metrics.requests.labels("grpc", type(exc).__name__).inc()
                    await context.abort(
                        status_of(exc), f"request {request_id!r}: {exc}", trailing_metadata(exc)
                    )
                self.metrics.requests.labels("grpc", "ok").inc()
                for block in blocks:
                    yield block
            await reader  # surfaces a failed read (e.g. the caller cancelled)
        finally:
            reader.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if item is not None:
                    item[1].cancel()


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
    server = new_server(max_message_bytes, [TokenAuth(api_key)] if api_key else None)
    add_guarded(aligner_pb2_grpc.add_AlignerServicer_to_server, servicer, server)
    health = await add_health_and_reflection(server, SERVICE)
    try:
        bound = add_port(server, f"{host}:{port}", credentials)
    except StartupError:
        await server.stop(None)
        raise
    await server.start()
    return server, bound, health
