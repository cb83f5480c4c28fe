"""The teacher's error hierarchy, mapped to gRPC status codes once (in ``server``)."""

from __future__ import annotations


class TeacherError(Exception):
    """Base class."""


class InvalidRequest(TeacherError):
    """The caller's mistake; ``field`` names what is wrong (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Overloaded(TeacherError):
    """The queue is full (RESOURCE_EXHAUSTED); retry later."""


class EngineUnavailable(TeacherError):
    """The model is not loaded, has failed, or a remote engine is down (UNAVAILABLE)."""
