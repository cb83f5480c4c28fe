"""The REST listening socket: a TCP socket asyncio recognises, so every connection gets
TCP_NODELAY (without it each response waited on Nagle and the caller's delayed ACK)."""

from __future__ import annotations

import socket

from fuseserve.aligner.service.app import _bind


def test_the_rest_socket_is_tcp_with_nodelay():
    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only then
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client = socket.create_connection(sock.getsockname(), timeout=5)
        sock.setblocking(True)
        conn, _ = sock.accept()
        with client, conn:
            assert conn.proto == socket.IPPROTO_TCP
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()
