"""gRPC status for the shared error hierarchy, both ways: one server interceptor, one translator.

Covers the one table from error class to status code (matched with ``isinstance``, most specific
class first, so a subclass gets its parent's status; any other ``ServiceError`` is INTERNAL), the
trailing metadata that goes with a status (``retry-after`` in whole seconds on RESOURCE_EXHAUSTED,
like the REST header; ``fuseserve-field`` naming the bad field on INVALID_ARGUMENT),
``ErrorStatus``, a server interceptor that answers every ``ServiceError`` a handler raises (unary
or streaming, replies yielded or written with ``context.write``, any service) with that status,
``error_from_rpc``, which turns a gRPC error a client received back into the error class (its
message is the status details, unchanged; gRPC's own refusal of an oversize message is an
``InvalidRequest``), and ``retryable``, whether a failed call is worth sending again.

Leaves out: REST statuses (the aligner's ``rest``), authentication and malformed payloads
(``grpc_guard``), and what a caller does about an error (retry or not).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import grpc

from fuseserve.errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    ServiceError,
    Unavailable,
)

STATUS: tuple[tuple[type[ServiceError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)
FIELD_KEY = "fuseserve-field"
RETRY_KEY = "retry-after"
# gRPC's own refusal of a message over a size limit (sent or received): RESOURCE_EXHAUSTED, but
# the caller's mistake, which no retry fixes
OVERSIZE = "message larger than max"
# worth asking again (after a pause): a peer restarting, or shedding load
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def status_of(exc: ServiceError) -> grpc.StatusCode:
    """The status code of an error: its own class's, or its nearest listed ancestor's."""
    return next((code for cls, code in STATUS if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


def trailing_metadata(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    """``retry-after`` on RESOURCE_EXHAUSTED; the bad field's name on INVALID_ARGUMENT."""
    if isinstance(exc, Overloaded):
        return ((RETRY_KEY, str(max(1, math.ceil(exc.retry_after_s)))),)
    if isinstance(exc, InvalidRequest):
        return ((FIELD_KEY, exc.field),)
    return ()


class ErrorStatus(grpc.aio.ServerInterceptor):
    """Answers a ``ServiceError`` raised by any handler of the server with its status, its
    message as the details and its trailing metadata; ``on_error`` sees each one first (metrics).
    """

    def __init__(self, on_error: Callable[[ServiceError], None] | None = None) -> None:
        self.on_error = on_error

    async def intercept_service(self, continuation, details):
        return self.wrap(await continuation(details))

    async def abort(self, context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
        if self.on_error is not None:
            self.on_error(exc)
        await context.abort(status_of(exc), str(exc), trailing_metadata(exc))

    def wrap(self, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        abort = self.abort
        if handler.response_streaming:
            name = "stream_stream" if handler.request_streaming else "unary_stream"
        else:
            name = "stream_unary" if handler.request_streaming else "unary_unary"
        inner = getattr(handler, name)
        if inspect.isasyncgenfunction(inner):  # replies yielded (else written, or one reply)

            async def streaming(request, context):
                try:
                    async for reply in inner(request, context):
                        yield reply
                except ServiceError as exc:
                    await abort(context, exc)

            return handler._replace(**{name: streaming})

        async def awaited(request, context):
            try:
                return await inner(request, context)
            except ServiceError as exc:
                await abort(context, exc)

        return handler._replace(**{name: awaited})


def retryable(exc: grpc.RpcError) -> bool:
    """Whether a failed call may succeed if sent again: UNAVAILABLE, or RESOURCE_EXHAUSTED that
    is load shedding (not gRPC refusing a message over its size limit)."""
    code = exc.code() if hasattr(exc, "code") else None
    if code not in RETRYABLE:
        return False
    return OVERSIZE not in (exc.details() or "").lower()


def _metadata(exc: grpc.RpcError) -> dict[str, str]:
    try:
        pairs = exc.trailing_metadata() or ()
    except Exception:  # a locally made error without a call behind it
        pairs = ()
    out = {}
    for key, value in pairs:
        out[key] = value if isinstance(value, str) else value.decode(errors="replace")
    return out


def error_from_rpc(exc: grpc.RpcError) -> ServiceError:
    """The error class a gRPC error stands for; ``str()`` of it is the status details and
    ``remote_status`` the status name. Codes outside the table give a plain ``ServiceError``."""
    code = exc.code()
    details = exc.details() or code.name
    meta = _metadata(exc)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        head, sep, _ = details.partition(": ")
        error: ServiceError = InvalidRequest(meta.get(FIELD_KEY) or (head if sep else ""), "")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and OVERSIZE in details.lower():
        error = InvalidRequest("request", "")
        details = f"request: {details} (the gRPC max_message_bytes limit)"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        try:
            retry_after_s = float(meta.get(RETRY_KEY, 1.0))
        except ValueError:
            retry_after_s = 1.0
        error = Overloaded(details, retry_after_s)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        error = DeadlineExceeded(details)
    elif code == grpc.StatusCode.UNAVAILABLE:
        error = Unavailable(details)
    else:
        error = ServiceError(details)
    error.args = (details,)
    error.remote_status = code.name
    return error
