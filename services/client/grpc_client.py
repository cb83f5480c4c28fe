"""The gRPC transport of the client: ``Info``, ``Fuse`` (sync and async) and ``FuseStream`` (sync).

Covers the channel (TLS credentials and bearer key as arguments, else from
``FUSESERVE_CLIENT_TLS_CA`` / ``_TLS_CERT`` / ``_TLS_KEY`` / ``_API_KEY``), a deadline on every
unary call, turning replies into ``FuseReply`` (the top-n and position range are applied here,
after the transfer: gRPC carries whole blocks) and status codes into ``FuseError``.

Leaves out: reconnecting a broken stream (its caller knows what to ask again: the trainer's
``prefetch``) and REST.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import grpc

from fuseserve.client.params import FuseError, FuseParams, call_texts
from fuseserve.errors import InvalidRequest, Overloaded
from fuseserve.wire import convert
from fuseserve.wire.fuse_reply import FuseReply
from fuseserve.wire.grpc_channel import (
    aio_channel,
    auth_metadata,
    channel_options,
    client_security_from_env,
    sync_channel,
)
from fuseserve.wire.status import error_from_rpc
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc

DEFAULT = FuseParams()


class StreamCall(Protocol):
    """What ``GrpcClient.stream`` returns: the replies as they come, and ``cancel()``."""

    def __iter__(self) -> Iterator[aligner_pb2.FusedBlock]: ...

    def __next__(self) -> aligner_pb2.FusedBlock: ...

    def cancel(self) -> bool: ...


def rpc_error(exc: grpc.RpcError) -> FuseError:
    if not hasattr(exc, "code"):  # not a call's error (e.g. a channel that never opened)
        return FuseError("UNKNOWN", "UNKNOWN", str(exc))
    error = error_from_rpc(exc)
    code = error.remote_status or "UNKNOWN"  # error_from_rpc always sets it
    field = (error.field or None) if isinstance(error, InvalidRequest) else None
    retry = error.retry_after_s if isinstance(error, Overloaded) else None
    return FuseError(code, code, str(error), field, retry)


def reply_of(reply: aligner_pb2.FuseReply, params: FuseParams) -> FuseReply:
    """A gRPC ``FuseReply`` as arrays, each block cut as ``params`` says."""
    blocks = [params.cut(m.index, convert.fused_block_from_pb(m)) for m in reply.blocks]
    fingerprint = reply.blocks[0].target_fingerprint if reply.blocks else None
    return FuseReply(tuple(blocks), target_fingerprint=fingerprint)


class _GrpcBase:
    """``timeout_s``: the deadline of each unary call; ``credentials``: TLS
    (``grpc_channel.channel_credentials``); neither it nor ``api_key`` given: both from the
    environment."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if credentials is None and api_key is None:
            credentials, api_key = client_security_from_env()
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = auth_metadata(api_key)
        self.channel = self._open(address, credentials, channel_options(max_message_bytes))
        self.stub = aligner_pb2_grpc.AlignerStub(self.channel)

    def _open(self, address, credentials, options):
        raise NotImplementedError


class GrpcClient(_GrpcBase):
    """Sync gRPC client."""

    def _open(self, address, credentials, options) -> grpc.Channel:
        return sync_channel(address, credentials, options)

    def info(self) -> aligner_pb2.InfoReply:
        try:
            return self.stub.Info(
                aligner_pb2.InfoRequest(), timeout=self.timeout_s, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def fuse(
        self,
        texts: str | Sequence[str] | None = None,
        params: FuseParams = DEFAULT,
        request_id: str = "",
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> FuseReply:
        """Fused blocks for ``texts``, or for target ``token_ids`` (exactly one of the two)."""
        request = params.grpc_request(request_id, call_texts(texts, token_ids), token_ids)
        try:
            reply = self.stub.Fuse(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return reply_of(reply, params)

    def stream(
        self, requests: Iterable[aligner_pb2.FuseRequest], timeout_s: float | None = None
    ) -> StreamCall:
        """``FuseStream``: replies in request order, as they come (``FusedBlock.from_bytes``
        decodes ``.block``). The returned call also has ``cancel()``. ``timeout_s`` bounds the
        whole stream (None: unbounded, for a stream as long as a training run, whose caller
        bounds each wait instead). gRPC errors are raised as ``grpc.RpcError``."""
        return self.stub.FuseStream(requests, timeout=timeout_s, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGrpcClient(_GrpcBase):
    """Async gRPC client (grpc.aio); the same arguments as ``GrpcClient``."""

    def _open(self, address, credentials, options) -> grpc.aio.Channel:
        return aio_channel(address, credentials, options)

    async def info(self) -> aligner_pb2.InfoReply:
        try:
            return await self.stub.Info(
                aligner_pb2.InfoRequest(), timeout=self.timeout_s, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    async def fuse(
        self,
        texts: str | Sequence[str] | None = None,
        params: FuseParams = DEFAULT,
        request_id: str = "",
        *,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> FuseReply:
        """As ``GrpcClient.fuse``."""
        request = params.grpc_request(request_id, call_texts(texts, token_ids), token_ids)
        try:
            reply = await self.stub.Fuse(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return reply_of(reply, params)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
