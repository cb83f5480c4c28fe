"""gRPC status for the shared error hierarchy, both ways: one server interceptor, one translator.

Covers the status of an error (its class's ``grpc_code``, inherited by subclasses), the trailing
metadata that goes with it (``retry-after`` in whole seconds when the error says when to retry,
like the REST header; ``fuseserve-field`` naming the bad field when it names one),
``ErrorStatus``, a server interceptor that answers every ``ServiceError`` a handler raises (unary
or streaming, replies yielded or written with ``context.write``, any service) with that status,
``error_from_rpc``, which turns a gRPC error a client received back into the error class (its
message is the status details, unchanged; gRPC's own refusal of an oversize message is a
``PayloadTooLarge``), and ``retryable``, whether a failed call is worth sending again.

Leaves out: which status each error has (the classes in ``fuseserve.errors`` say it), REST
(the aligner's ``http_errors``), authentication and malformed payloads (``grpc_server``), and what
a caller does about an error (retry or not).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc

from fuseserve.errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    Unavailable,
)

# the class a client raises for a peer's status: the most general class with that code
CLIENT_CLASSES = (InvalidRequest, Overloaded, Unavailable, DeadlineExceeded, Unauthorized)
REMOTE: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode[cls.grpc_code]: cls for cls in CLIENT_CLASSES
}
FIELD_KEY = "fuseserve-field"
RETRY_KEY = "retry-after"
# gRPC's own refusal of a message over a size limit (sent or received): RESOURCE_EXHAUSTED, but
# the caller's mistake, which no retry fixes
OVERSIZE = "message larger than max"
# worth asking again (after a pause): a peer restarting, or shedding load
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def status_of(exc: ServiceError) -> grpc.StatusCode:
    """The status code of an error: the one its class (or its nearest ancestor) names."""
    return grpc.StatusCode[exc.grpc_code]


def trailing_metadata(exc: ServiceError) -> tuple[tuple[str, str], ...]:
    """``retry-after`` when the error says when to retry; the bad field's name when it has one."""
    pairs = []
    retry = exc.retry_after()
    if retry is not None:
        pairs.append((RETRY_KEY, retry))
    if exc.field is not None:
        pairs.append((FIELD_KEY, exc.field))
    return tuple(pairs)


async def abort_with(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    """End a call with ``exc``'s status, its message as the details, and its metadata."""
    await context.abort(status_of(exc), str(exc), trailing_metadata(exc))


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
        await abort_with(context, exc)

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
    """The error class a gRPC error stands for (``REMOTE``); ``str()`` of it is the status
    details and ``remote_status`` the status name. Codes outside the table give a plain
    ``ServiceError``."""
    code = exc.code()
    details = exc.details() or code.name
    meta = _metadata(exc)
    cls = REMOTE.get(code, ServiceError)
    error: ServiceError
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and OVERSIZE in details.lower():
        error = PayloadTooLarge("request", "")
        details = f"request: {details} (the gRPC max_message_bytes limit)"
    elif issubclass(cls, InvalidRequest):
        head, sep, _ = details.partition(": ")
        error = cls(meta.get(FIELD_KEY) or (head if sep else ""), "")
    elif issubclass(cls, Overloaded):
        try:
            retry_after_s = float(meta.get(RETRY_KEY, 1.0))
        except ValueError:
            retry_after_s = 1.0
        error = cls(details, retry_after_s)
    else:
        error = cls(details)
    if error.field is None and FIELD_KEY in meta:  # a field named with another status
        error.field = meta[FIELD_KEY]
    error.args = (details,)
    error.remote_status = code.name
    return error
