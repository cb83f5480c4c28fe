"""The teacher gRPC server: thin handlers over one backend and one batcher.

Covers the ``fuseserve.teacher.v1.Teacher`` service (Info, Vocab, Score), request limits checked
before any model work (INVALID_ARGUMENT naming the field), overload (RESOURCE_EXHAUSTED at once),
the standard health service (NOT_SERVING until the model is loaded and while the engine fails),
server reflection, explicit message-size limits, Prometheus metrics, and a SIGTERM drain.

Leaves out: the model (``hf_backend``), batching (``batcher``), protobuf conversion
(``fuseserve.wire.convert``) and the error -> status mapping (``fuseserve.wire.status``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from fuseserve.errors import StartupError
from fuseserve.teacher.backend import ScoringBackend
from fuseserve.teacher.batcher import DynamicBatcher
from fuseserve.teacher.errors import EngineUnavailable, InvalidRequest
from fuseserve.teacher.metrics import TeacherMetrics
from fuseserve.teacher.settings import TeacherSettings
from fuseserve.wire import convert
from fuseserve.wire.descriptions import TeacherInfo
from fuseserve.wire.grpc_server import Health
from fuseserve.wire.grpc_server import start_server as start_grpc_server
from fuseserve.wire.requests import ScoreQuery
from fuseserve.wire.v1 import teacher_pb2, teacher_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = "fuseserve.teacher.v1.Teacher"


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    """Handlers raise the shared errors; ``wire.status.ErrorStatus`` answers them."""

    def __init__(self, settings: TeacherSettings, metrics: TeacherMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backend: ScoringBackend | None = None
        self.batcher: DynamicBatcher | None = None
        self._tokenize = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    def _ready(self) -> tuple[ScoringBackend, DynamicBatcher]:
        if self.backend is None or self.batcher is None:
            raise EngineUnavailable("model is still loading")
        return self.backend, self.batcher

    def describe(self) -> TeacherInfo:
        backend, _ = self._ready()
        return TeacherInfo.describe(
            backend.view,
            **dataclasses.asdict(backend.info),
            max_batch_texts=self.settings.max_batch_texts,
            max_request_tokens=self.settings.max_request_tokens,
        )

    async def Info(self, request, context):
        return convert.teacher_info_to_pb(self.describe())

    async def Vocab(self, request, context) -> AsyncIterator[teacher_pb2.VocabChunk]:
        backend, _ = self._ready()
        size = request.chunk_size or 8192
        if size < 0:
            raise InvalidRequest("chunk_size", "must be >= 0")
        for chunk in convert.vocab_chunks_to_pb(backend.view.tokens, size):
            yield chunk

    def _validate(self, query: ScoreQuery, backend: ScoringBackend):
        s = self.settings
        if not query.texts:
            raise InvalidRequest("texts", "must hold at least one text")
        if len(query.texts) > s.max_batch_texts:
            raise InvalidRequest(
                "texts", f"{len(query.texts)} texts exceed max_batch_texts={s.max_batch_texts}"
            )
        max_k = min(backend.info.max_k, backend.view.vocab_size)
        if not 1 <= query.k <= max_k:
            raise InvalidRequest("k", f"must be in [1, {max_k}], got {query.k}")
        for i, text in enumerate(query.texts):
            if not text:
                raise InvalidRequest(f"texts[{i}]", "is empty")
            if len(text) > s.max_text_chars:
                limit = s.max_text_chars
                raise InvalidRequest(
                    f"texts[{i}]", f"{len(text)} characters exceed max_text_chars={limit}"
                )
        return [
            backend.tokenize(text, query.add_bos, truncate=query.truncate, field=f"texts[{i}]")
            for i, text in enumerate(query.texts)
        ]

    def _check_tokens(self, items) -> None:
        s = self.settings
        total = sum(len(t.ids) for t in items)
        if total > s.max_request_tokens:
            raise InvalidRequest(
                "texts", f"{total} tokens exceed max_request_tokens={s.max_request_tokens}"
            )

    async def Score(self, request, context) -> AsyncIterator[teacher_pb2.ScoreReply]:
        started = time.perf_counter()
        backend, batcher = self._ready()
        query = convert.score_query_from_pb(request)
        # tokenising a long text takes a while: in one worker thread, off the event loop
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(self._tokenize, self._validate, query, backend)
        self._check_tokens(items)
        results = await batcher.submit(items, query.k)
        for index, result in enumerate(results):
            yield convert.score_reply_to_pb(index, result, query.float_dtype)
        self.metrics.latency.observe(time.perf_counter() - started)


@dataclass
class RunningTeacher:
    server: grpc.aio.Server
    port: int
    servicer: TeacherServicer
    health: Health
    metrics: TeacherMetrics

    async def set_backend(self, backend: ScoringBackend) -> None:
        s = self.servicer.settings

        def on_health(ok: bool) -> None:
            asyncio.get_running_loop().create_task(self.health.set_serving(ok))

        batcher = DynamicBatcher(
            backend.score,
            token_budget=s.batch_token_budget,
            wait_s=s.batch_wait_ms / 1000.0,
            max_queue=s.max_queue_sequences,
            metrics=self.metrics,
            on_health=lambda ok: asyncio.get_event_loop().call_soon_threadsafe(on_health, ok),
        )
        batcher.start()
        self.servicer.backend, self.servicer.batcher = backend, batcher
        await self.health.set_serving(True)

    async def stop(self, grace: float) -> None:
        """Refuse new work, drain what is in flight within ``grace`` seconds, stop."""
        await self.health.set_serving(False)
        await self.server.stop(grace)
        if self.servicer.batcher is not None:
            await self.servicer.batcher.close()


async def start_server(settings: TeacherSettings) -> RunningTeacher:
    """Start serving (health NOT_SERVING) before any model is attached."""
    metrics = TeacherMetrics()
    servicer = TeacherServicer(settings, metrics)
    running = await start_grpc_server(
        SERVICE, teacher_pb2_grpc.add_TeacherServicer_to_server, servicer,
        f"{settings.host}:{settings.port}", settings.max_message_bytes, settings.key(),
        settings.grpc_credentials(),
        on_error=lambda exc: metrics.failures.labels(type(exc).__name__).inc(),
    )  # fmt: skip
    return RunningTeacher(running.server, running.port, servicer, running.health, metrics)


def load_backend(settings: TeacherSettings) -> ScoringBackend:
    if settings.backend == "hf":
        from fuseserve.teacher.hf_backend import HFBackend

        return HFBackend.load(
            settings.model,
            tokenizer_spec=settings.tokenizer,
            revision=settings.revision,
            device=settings.device,
            dtype=settings.dtype,
            max_sequence_length=settings.max_sequence_length,
            max_k=settings.max_k,
            chunk_positions=settings.score_chunk_positions,
        )
    if settings.backend in ("vllm", "tgi"):
        from fuseserve.loading import load_tokenizer
        from fuseserve.teacher.tgi_backend import TGIBackend
        from fuseserve.teacher.vllm_backend import VLLMBackend

        if not settings.remote_url:  # TeacherSettings validation requires it for these two
            raise ValueError(
                f"remote_url: the {settings.backend} backend needs the server's base URL"
            )
        remote = (settings.remote_url, settings.model)
        tokenizer = load_tokenizer(settings.tokenizer or settings.model)
        length = settings.max_sequence_length
        if settings.backend == "vllm":
            return VLLMBackend(*remote, tokenizer, max_k=settings.max_k, max_sequence_length=length)
        return TGIBackend(*remote, tokenizer, max_sequence_length=length)
    raise EngineUnavailable(f"backend {settings.backend!r} is not available in this build")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its first line of text, or its type."""
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return text[0].strip() if text else type(exc).__name__


async def serve(settings: TeacherSettings) -> None:
    """Run until SIGTERM/SIGINT, then drain and return (exit code 0). A model that cannot be
    loaded or a port that cannot be bound raises ``StartupError`` (one line; exit code 1)."""
    from prometheus_client import start_http_server

    running = await start_server(settings)
    log.info("teacher listening on %s:%d (loading %s)", settings.host, running.port, settings.model)
    if settings.metrics_port:
        try:
            start_http_server(
                settings.metrics_port, addr=settings.host, registry=running.metrics.registry
            )
        except OSError as exc:
            await running.server.stop(None)
            raise StartupError(
                f"metrics_port: cannot listen on {settings.host}:{settings.metrics_port}: "
                f"{exc.strerror or exc}"
            ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load = loop.run_in_executor(None, load_backend, settings)
    stopping = asyncio.ensure_future(stop.wait())
    waiting: list[asyncio.Future[Any]] = [load, stopping]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if load in done:
        try:
            backend = load.result()
        except Exception as exc:
            stopping.cancel()
            await running.stop(0)
            log.debug("model load failed", exc_info=exc)
            raise StartupError(f"model: cannot load {settings.model!r}: {one_line(exc)}") from exc
        await running.set_backend(backend)
        log.info("teacher ready: %s", settings.model)
        await stop.wait()
    log.info("draining (grace %.0fs)", settings.drain_seconds)
    await running.stop(settings.drain_seconds)
