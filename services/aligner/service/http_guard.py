"""What guards the aligner's REST port below the app: a header read deadline and a connection cap.

Covers uvicorn's HTTP/1.1 protocol (httptools) with two additions: a request's headers must
arrive within ``header_timeout_s`` of the connection opening or of the request's first byte
(else ``408`` and the connection closes; uvicorn itself waits forever for a slow sender, so a few
thousand connections that dribble header bytes would hold as many file descriptors), and at most
``max_connections`` connections are open at once (a connection past the cap gets ``503`` with
``Retry-After`` and is closed at once, before it can cost a request's worth of work); both
answers are the REST error envelope (``http_errors``).

Leaves out: body limits and body deadlines (``body_limit.BodyLimit``), request admission (the data
plane's 429s) and everything the app does.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fuseserve.aligner.service.http_errors import raw_response
from fuseserve.errors import RequestTimeout, TooManyConnections


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a connection cap (class
    attributes set by ``guarded_http``)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            message = f"{self.max_connections} connections open (max_connections); retry later"
            transport.write(raw_response(TooManyConnections(message)))
            transport.close()
            return
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        limit = f"header_timeout_s={self.header_timeout_s:g}"
        message = f"request headers did not arrive within {limit}"
        self.transport.write(raw_response(RequestTimeout(message)))
        self.transport.close()


def guarded_http(header_timeout_s: float, max_connections: int) -> type[GuardedHttpProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with these limits."""
    return type(
        "GuardedHttp",
        (GuardedHttpProtocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )
