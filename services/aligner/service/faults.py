"""What can go wrong with a teacher, as the aligner's pool reports it.

Covers the teacher-level faults the pool raises: a teacher nobody configured, one that is down or
not ready (or did not answer in time), one that is overloaded, one that refused the input, and a
map it needs that was never built. Each names the teacher; none is a request error: the data
plane decides which field of a request, if any, was at fault (``dataplane.request_error``).

Leaves out: gRPC (the client translates status codes into the shared errors first) and the
mapping to request errors and statuses.
"""

from __future__ import annotations


class TeacherFault(Exception):
    """Something about teacher ``teacher``; the message says what."""

    def __init__(self, teacher: str, message: str) -> None:
        super().__init__(message)
        self.teacher = teacher


class UnknownTeacher(TeacherFault):
    """No teacher of that name is configured."""


class TeacherUnavailable(TeacherFault):
    """Down, not ready yet, failing, or too slow to answer."""


class TeacherOverloaded(TeacherFault):
    """Every replica tried is overloaded; retry after ``retry_after_s`` seconds."""

    def __init__(self, teacher: str, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(teacher, message)
        self.retry_after_s = retry_after_s


class TeacherRejected(TeacherFault):
    """The teacher refused the input it was sent (``field``: the teacher's own field name)."""

    def __init__(self, teacher: str, message: str, field: str = "") -> None:
        super().__init__(teacher, message)
        self.field = field


class MapMissing(TeacherFault):
    """A vocabulary map the request needs for this teacher has not been built."""
