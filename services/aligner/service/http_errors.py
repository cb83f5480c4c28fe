"""Errors as HTTP answers: the REST API's one error envelope, for every layer that answers one.

Covers the envelope ``{"error": {"type", "message", "field"?}}`` of a ``ServiceError`` (its
class name, its message, the field it names), its status (the class's ``http_status``) and
headers (``Retry-After`` when the error says when to retry, ``WWW-Authenticate`` on a 401), in
the three forms the layers need: a FastAPI ``Response`` (handlers), ASGI messages (the
``BodyLimit`` middleware) and a whole HTTP/1.1 response as bytes (``http_guard``, below the app).

Leaves out: which status an error has (the classes in ``fuseserve.errors`` say it) and the
vLLM-compatible route's own error shape (``openai_api``).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi.responses import Response

from fuseserve.errors import ServiceError, Unauthorized

JSON = "application/json"


def envelope(kind: str, message: str, field: str | None = None) -> bytes:
    """The envelope's bytes (non-ASCII escaped: a lone surrogate echoed back cannot break it)."""
    error: dict[str, Any] = {"type": kind, "message": message}
    if field is not None:
        error["field"] = field
    return json.dumps({"error": error}, ensure_ascii=True, allow_nan=False).encode()


def error_headers(exc: ServiceError) -> dict[str, str]:
    """The headers that go with ``exc``'s status."""
    headers = {}
    retry = exc.retry_after()
    if retry is not None:
        headers["Retry-After"] = retry
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_body(exc: ServiceError) -> bytes:
    return envelope(type(exc).__name__, str(exc), exc.field)


def error_response(exc: ServiceError) -> Response:
    """``exc`` as a FastAPI response."""
    headers = error_headers(exc) or None
    return Response(error_body(exc), exc.http_status, headers, media_type=JSON)


def closing_headers(exc: ServiceError, body: bytes) -> list[tuple[str, str]]:
    """Every header of a response that answers ``exc`` and closes the connection."""
    return [
        ("content-type", JSON),
        ("content-length", str(len(body))),
        ("connection", "close"),
        *((name.lower(), value) for name, value in error_headers(exc).items()),
    ]


async def send_error(send, exc: ServiceError) -> None:
    """Answer ``exc`` through an ASGI ``send`` (the connection closes after it)."""
    body = error_body(exc)
    headers = [(k.encode(), v.encode()) for k, v in closing_headers(exc, body)]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def raw_response(exc: ServiceError) -> bytes:
    """``exc`` as a whole HTTP/1.1 response (the connection closes after it)."""
    body = error_body(exc)
    status = HTTPStatus(exc.http_status)
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in closing_headers(exc, body))
    return (head + "\r\n").encode("latin-1") + body
