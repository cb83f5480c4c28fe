"""Refusing overload before a request is parsed: an ASGI middleware for the REST front.

Covers one path (``POST /v1/fuse``): once the body has been read (``BodyLimit`` sits outside this
middleware, so it arrives as one message) and before routing, validation and JSON parsing, it asks
``refusal(headers, body)`` and, if that returns a response (a 429 while the service could not take
more work in time), sends it; otherwise the app gets the body as if nothing had read it. Under
overload most requests are refused, so their cost is what decides whether the event loop keeps
up; this keeps a refusal to a dictionary look-up and a short JSON reply.

Leaves out: the admission rule itself (the data plane's) and authentication (``refusal`` decides
to let an unauthenticated request through so that it gets its 401 from the app).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.responses import Response


class RefuseBeforeParsing:
    def __init__(
        self,
        app,
        path: str,
        refusal: Callable[[Mapping[bytes, bytes], bytes], Response | None],
    ) -> None:
        self.app = app
        self.path = path
        self.refusal = refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        first = await receive()
        body = first.get("body", b"") if first["type"] == "http.request" else b""
        response = self.refusal(dict(scope.get("headers") or []), body)
        if response is not None:
            return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return await self.app(scope, replay, send)
