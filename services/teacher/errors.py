"""The teacher's errors: the shared hierarchy (``fuseserve.errors``) plus the engine failure."""

from __future__ import annotations

from fuseserve.errors import InvalidRequest, Overloaded, ServiceError, Unavailable

TeacherError = ServiceError

__all__ = ["EngineUnavailable", "InvalidRequest", "Overloaded", "TeacherError"]


class EngineUnavailable(Unavailable):
    """The model is not loaded, has failed, or a remote engine is down (UNAVAILABLE)."""
