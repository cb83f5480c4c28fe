"""The REST port's body limits: an ASGI middleware that reads each whole body before any handler.

Covers the size limit (``max_body_bytes``: 413 by ``Content-Length`` at once, or as soon as the
chunks pass it) and the time limit (``body_timeout_s``: 408), both in the REST error envelope and
closing the connection, and replaying the body to the app once read.

Leaves out: header deadlines and the connection cap (``http_guard``, below the app) and what the
app does with the body.
"""

from __future__ import annotations

import asyncio
import contextlib

from fuseserve.aligner.service.http_errors import send_error
from fuseserve.errors import PayloadTooLarge, RequestTimeout


class BodyLimit:
    """ASGI middleware: the whole body is read here, before any handler, within ``timeout_s``
    and ``max_bytes``: larger bodies get 413 (by Content-Length at once, or when chunks pass
    the limit), bodies that do not arrive in time 408; both close the connection."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        loop = asyncio.get_running_loop()
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # read on (discarding, briefly) before answering: closing on a caller that is still
            # sending resets the connection, and the reset can destroy the 413 in flight
            await self._drain(receive, loop.time() + 2.0, 4 * self.max_bytes)
            return await self._too_large(send)
        deadline = loop.time() + self.timeout_s
        chunks: list[bytes] = []
        seen = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                limit = f"body_timeout_s={self.timeout_s:g}"
                return await send_error(send, RequestTimeout(f"body: not received within {limit}"))
            if message["type"] == "http.disconnect":
                return None  # the caller left: nothing to answer
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                # read on (discarding, briefly) so the caller, still sending, can read the 413
                await self._drain(receive, min(deadline, loop.time() + 2.0), 4 * self.max_bytes)
                return await self._too_large(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive, until: float, budget: int) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            while budget > 0 and loop.time() < until:
                message = await asyncio.wait_for(receive(), until - loop.time())
                budget -= len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return

    async def _too_large(self, send) -> None:
        limit = f"max_body_bytes={self.max_bytes}"
        await send_error(send, PayloadTooLarge("body", f"larger than {limit}"))
