"""A minimal HTTP/1.1 load generator for the benchmarks: keep-alive connections, no parsing.

Covers ``RawPool.post(path, body)``: send one JSON POST on a free kept-alive connection (a new one
when none is free, up to ``max_connections``) and return (status, body bytes). It reads only the
status line, the headers it needs (Content-Length, Connection) and the body. Much cheaper per
request than a full client (httpx), so on a small machine the generator itself does not become
the bottleneck of an overload test.

Leaves out: chunked bodies, redirects, TLS, anything a real client needs (use fuseserve.client).
"""

from __future__ import annotations

import asyncio
import json


class RawPool:
    def __init__(self, host: str, port: int, max_connections: int = 512) -> None:
        self.host, self.port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def post(self, path: str, body: dict, timeout: float = 60.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        async with self._slots:
            async with asyncio.timeout(timeout):
                while self._idle:  # a kept-alive connection the server may have closed since
                    reader, writer = self._idle.pop()
                    try:
                        return await self._send(reader, writer, head + data)
                    except (ConnectionError, asyncio.IncompleteReadError):
                        continue
                reader, writer = await asyncio.open_connection(self.host, self.port)
                return await self._send(reader, writer, head + data)

    async def _send(self, reader, writer, request: bytes) -> tuple[int, bytes]:
        try:
            status, payload, keep = await self._exchange(reader, writer, request)
        except BaseException:
            writer.close()
            raise
        if keep:
            self._idle.append((reader, writer))
        else:
            writer.close()
        return status, payload

    @staticmethod
    async def _exchange(reader, writer, request: bytes) -> tuple[int, bytes, bool]:
        writer.write(request)
        await writer.drain()
        header = await reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip().lower()
        payload = await reader.readexactly(int(fields.get("content-length", "0")))
        return status, payload, fields.get("connection") != "close"

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
