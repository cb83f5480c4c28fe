"""The REST port below the app, on a real aligner: a request whose headers dribble in is answered
408 and closed after ``header_timeout_s``; past ``max_connections`` a new connection is answered
503 and closed at once; normal requests are unaffected."""

from __future__ import annotations

import json
import socket
import time

import pytest

from fuseserve.launch import wait_until
from tests.service_fixtures import aligner_settings, start_handle


@pytest.fixture(scope="module")
def guarded(service_loop, teacher_procs, vocab_dir):
    settings = aligner_settings(teacher_procs, vocab_dir, header_timeout_s=1.0, max_connections=3)
    handle = start_handle(service_loop, settings)
    yield handle
    handle.close()


def connect(handle) -> socket.socket:
    return socket.create_connection(("127.0.0.1", handle.running.rest_port), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_headers_that_do_not_arrive_in_time_get_408_and_the_connection_closes(guarded):
    with connect(guarded) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        start = time.monotonic()
        answer = read_all(slow)  # returns once the server closes
    assert time.monotonic() - start < 20  # closed by the server, not by the socket timeout
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert "header_timeout_s=1" in json.loads(body)["error"]["message"]
    assert guarded.rest.get("/healthz").status_code == 200


def test_a_connection_past_the_cap_is_refused_and_the_others_are_served(guarded):
    held = [connect(guarded) for _ in range(3)]
    try:
        wait_until(lambda: len(open_connections(guarded)) >= 3, 10, "three connections open")
        with connect(guarded) as extra:
            head, _, body = read_all(extra).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
        assert "max_connections" in json.loads(body)["error"]["message"]
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(held[0]).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: guarded.rest.get("/healthz").status_code == 200, 10, "served again")


def open_connections(handle) -> set:
    return handle.running.rest_server.server_state.connections
