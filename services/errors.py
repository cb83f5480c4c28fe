"""The error hierarchy every fuseserve service shares, mapped to a status once per transport.

``InvalidRequest`` -> 422 / INVALID_ARGUMENT (names the field), ``Overloaded`` -> 429 /
RESOURCE_EXHAUSTED, ``Unavailable`` -> 503 / UNAVAILABLE (names the dependency).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class."""


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


class StartupError(Exception):
    """A service cannot start (missing model, unreadable tokenizer, port in use): one line
    naming what and why; the CLI prints it and exits 1 (traceback only with FUSESERVE_DEBUG=1)."""
