"""The error hierarchy every fuseserve service shares, mapped to a status once per transport.

``InvalidRequest`` -> 422 / INVALID_ARGUMENT (names the field), ``Overloaded`` -> 429 /
RESOURCE_EXHAUSTED, ``Unavailable`` -> 503 / UNAVAILABLE (names the dependency),
``DeadlineExceeded`` (an ``Unavailable``) -> DEADLINE_EXCEEDED, any other ``ServiceError`` -> 500 /
INTERNAL. The gRPC mapping, both ways, is ``fuseserve.wire.status``.

Leaves out: the transports themselves.
"""

from __future__ import annotations

from typing import Self


class ServiceError(Exception):
    """Base class. ``remote_status``: the gRPC status name a peer answered, when this error
    stands for a peer's answer (set by ``fuseserve.wire.status.error_from_rpc``)."""

    remote_status: str | None = None

    def prefixed(self, prefix: str) -> Self:
        """The same error with ``prefix`` before its message (e.g. which request of a stream);
        this one is left as it is (it may be shared between callers)."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.args = (f"{prefix}{self}",)
        return clone


class InvalidRequest(ServiceError):
    """The caller's mistake; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Overloaded(ServiceError):
    """Too much work in flight; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    """A dependency (a model, a teacher, a remote engine) is down or not ready yet."""


class DeadlineExceeded(Unavailable):
    """The caller's time ran out before the answer came."""


class StartupError(Exception):
    """A service cannot start (missing model, unreadable tokenizer, port in use): one line
    naming what and why; the CLI prints it and exits 1 (traceback only with FUSESERVE_DEBUG=1)."""
