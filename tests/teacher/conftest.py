"""A real teacher gRPC server on port 0, in a background event loop, serving a tiny real model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fuseserve.teacher.hf_backend import HFBackend
from fuseserve.teacher.server import start_server
from fuseserve.teacher.settings import TeacherSettings
from fuseserve.teacher.tiny import save_tiny_llama


class LoopThread:
    """An asyncio loop in a thread; ``run(coro)`` blocks for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, mistral_tok):
    return save_tiny_llama(mistral_tok, tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    return HFBackend.load(str(tiny_model_dir), max_sequence_length=256, max_k=32)


def start_teacher(loop: LoopThread, backend, **overrides):
    settings = TeacherSettings(port=0, metrics_port=0, **overrides)

    async def go():
        running = await start_server(settings)
        if backend is not None:
            await running.set_backend(backend)
        return running

    return loop.run(go())


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def teacher(loop_thread, tiny_backend):
    running = start_teacher(loop_thread, tiny_backend, batch_wait_ms=2.0)
    yield running
    loop_thread.run(running.stop(1.0))


@contextlib.contextmanager
def json_http_server(answer):
    """A local HTTP server for remote-backend tests: POST bodies (JSON) go to
    ``answer(path, body)``, whose return value is sent back as JSON. Yields the base URL."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps(answer(self.path, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


class GatedBackend:
    """A real backend whose forward passes wait for ``gate`` (open by default): lets a test
    hold the model busy to build a queue, then let it go."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.gate = threading.Event()
        self.gate.set()
        self.busy = threading.Event()  # set when a forward pass reaches the gate

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def score(self, items, k):
        self.busy.set()
        self.gate.wait(120)
        return self.backend.score(items, k)
