"""What can go wrong with a teacher, as the aligner's pool reports it, and what each means.

Covers the teacher-level faults the pool raises: a teacher nobody configured, one that is down or
not ready (or did not answer in time), one that is overloaded, one that refused the input, and a
map it needs that was never built. Each names the teacher and says, on its class, the request
error it becomes (``becomes``; for a caller's mistake, ``field``: which field of the request was
at fault) and so its statuses (``http_status``, ``grpc_code``, read from that error class): a
new fault is one class here. ``request_errors`` turns a fault raised inside it into its request
error (the data plane wraps its teacher calls in it).

Leaves out: gRPC (the client translates status codes into the shared errors first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

from fuseserve.errors import InvalidRequest, Overloaded, ServiceError, Unavailable


class TeacherFault(Exception):
    """Something about teacher ``teacher``; the message says what."""

    becomes: ClassVar[type[ServiceError]] = Unavailable
    # the request field at fault, when ``becomes`` is an InvalidRequest
    field: ClassVar[str] = ""

    def __init__(self, teacher: str, message: str) -> None:
        super().__init__(message)
        self.teacher = teacher

    @classmethod
    def http_status(cls) -> int:
        return cls.becomes.http_status

    @classmethod
    def grpc_code(cls) -> str:
        return cls.becomes.grpc_code

    def request_error(self) -> ServiceError:
        """What this fault means for the request that met it."""
        if issubclass(self.becomes, InvalidRequest):
            return self.becomes(self.field, str(self))
        return self.becomes(str(self))


class UnknownTeacher(TeacherFault):
    """No teacher of that name is configured."""

    becomes = InvalidRequest
    field = "teachers"


class TeacherUnavailable(TeacherFault):
    """Down, not ready yet, failing, or too slow to answer."""


class TeacherOverloaded(TeacherFault):
    """Every replica tried is overloaded; retry after ``retry_after_s`` seconds."""

    becomes = Overloaded

    def __init__(self, teacher: str, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(teacher, message)
        self.retry_after_s = retry_after_s

    def request_error(self) -> ServiceError:
        return Overloaded(str(self), self.retry_after_s)


class TeacherRejected(TeacherFault):
    """The teacher refused the input it was sent (``teacher_field``: the teacher's own field
    name); the request's texts were sent as they came, so they are at fault."""

    becomes = InvalidRequest
    field = "texts"

    def __init__(self, teacher: str, message: str, field: str = "") -> None:
        super().__init__(teacher, message)
        self.teacher_field = field


class MapMissing(TeacherFault):
    """A vocabulary map the request needs for this teacher has not been built."""

    becomes = InvalidRequest
    field = "options.vocab"


@contextlib.contextmanager
def request_errors() -> Iterator[None]:
    """Teacher faults raised inside become the request errors they mean."""
    try:
        yield
    except TeacherFault as fault:
        raise fault.request_error() from fault
