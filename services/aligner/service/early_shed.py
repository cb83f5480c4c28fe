"""Refusing overload before a request is parsed: an ASGI middleware for the REST front.

Covers one path (``POST /v1/fuse``): once the body has been read (``BodyLimit`` sits outside this
middleware) and before routing, validation and JSON parsing, it asks ``refusal(headers)`` and, if
that returns a response (a 429 while no teacher could take more work in time), sends it. Under
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
        refusal: Callable[[Mapping[bytes, bytes]], Response | None],
    ) -> None:
        self.app = app
        self.path = path
        self.refusal = refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            response = self.refusal(dict(scope.get("headers") or []))
            if response is not None:
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
