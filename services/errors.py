"""The error hierarchy every fuseserve service shares; each class carries its own statuses.

Every class says what it is on each transport: ``http_status`` (REST), ``grpc_code`` (the name
of a ``grpc.StatusCode``; this module imports no gRPC) and, through ``retry_after_s`` and
``field``, what goes with the status (``Retry-After``; the field at fault). A subclass inherits
its parent's statuses unless it sets its own, so a new error class is one class here (or next to
the code that raises it) and every transport answers it correctly: the REST envelope
(``aligner.service.http_errors``), the gRPC interceptor and client translation
(``fuseserve.wire.status``) and the vLLM-compatible route (``aligner.service.openai_api``) read
these attributes and keep no table of their own.

``InvalidRequest`` -> 422 / INVALID_ARGUMENT (names the field; ``PayloadTooLarge`` 413,
``UnsupportedMediaType`` 415, ``UnknownModel`` 404 are kinds of it), ``Overloaded`` -> 429 /
RESOURCE_EXHAUSTED, ``Unavailable`` -> 503 / UNAVAILABLE (names the dependency),
``DeadlineExceeded`` (an ``Unavailable``) -> DEADLINE_EXCEEDED, ``Unauthorized`` -> 401 /
UNAUTHENTICATED, any other ``ServiceError`` -> 500 / INTERNAL.

Leaves out: the transports themselves.
"""

from __future__ import annotations

import math
from typing import ClassVar, Self


class ServiceError(Exception):
    """Base class. ``remote_status``: the gRPC status name a peer answered, when this error
    stands for a peer's answer (set by ``fuseserve.wire.status.error_from_rpc``)."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"
    remote_status: str | None = None
    # the request field at fault (InvalidRequest and its kinds), None otherwise
    field: str | None = None
    # seconds after which asking again may succeed (sent as Retry-After), None: not said
    retry_after_s: float | None = None

    def prefixed(self, prefix: str) -> Self:
        """The same error with ``prefix`` before its message (e.g. which request of a stream);
        this one is left as it is (it may be shared between callers)."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.args = (f"{prefix}{self}",)
        return clone

    def retry_after(self) -> str | None:
        """``retry_after_s`` in whole seconds (at least 1), as headers carry it; None if unset."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


class InvalidRequest(ServiceError):
    """The caller's mistake; ``field`` names what is wrong."""

    field: str
    http_status = 422
    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class PayloadTooLarge(InvalidRequest):
    """A request (REST body, gRPC message) over the service's size limit."""

    http_status = 413


class UnsupportedMediaType(InvalidRequest):
    """A body in a format the route does not read (``field``: the header that says so)."""

    http_status = 415


class UnknownModel(InvalidRequest):
    """A model name the service does not serve (the vLLM-compatible route's ``model``)."""

    http_status = 404
    grpc_code = "NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__("model", "")
        self.args = (f"The model `{name}` does not exist.",)  # vLLM's words, without the field


class NotAcceptable(ServiceError):
    """No answer format the caller accepts (REST's ``Accept`` header)."""

    http_status = 406
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(ServiceError):
    """No valid API key came with the request."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class RequestTimeout(ServiceError):
    """The request itself (headers, body) did not arrive in time: the caller is too slow."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class Overloaded(ServiceError):
    """Too much work in flight; retry after ``retry_after_s`` seconds."""

    retry_after_s: float
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    """A dependency (a model, a teacher, a remote engine) is down or not ready yet."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class TooManyConnections(Unavailable):
    """Every connection slot of a port is taken; retry after a second."""

    retry_after_s = 1.0


class DeadlineExceeded(Unavailable):
    """The caller's time ran out before the answer came."""

    grpc_code = "DEADLINE_EXCEEDED"


class StartupError(Exception):
    """A service cannot start (missing model, unreadable tokenizer, port in use): one line
    naming what and why; the CLI prints it and exits 1 (traceback only with FUSESERVE_DEBUG=1)."""
