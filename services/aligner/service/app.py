"""Assemble and run the aligner: REST (uvicorn) and gRPC in one process and one event loop.

Covers building the parts from ``AlignerSettings`` (target tokenizer, vocabulary-map store,
teacher pool, cache, data plane), starting both servers at once (readiness false), connecting the
teachers in the background (readiness true once every map is loaded), the periodic teacher
refresh, and a graceful stop on SIGTERM/SIGINT.

Leaves out: what the handlers do (``rest``, ``grpc_api``) and the work (``dataplane``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from dataclasses import dataclass, field

import grpc
import uvicorn

from fuseserve.aligner.continuation import hf_first_tokens
from fuseserve.aligner.service.cache import LRUCache, RedisCache
from fuseserve.aligner.service.dataplane import FusionService
from fuseserve.aligner.service.grpc_api import AlignerServicer, start_grpc
from fuseserve.aligner.service.http_guard import guarded_http
from fuseserve.aligner.service.metrics import AlignerMetrics, sample_loop_lag
from fuseserve.aligner.service.openai_api import add_openai_routes
from fuseserve.aligner.service.pool import TeacherPool
from fuseserve.aligner.service.rest import create_app
from fuseserve.aligner.service.settings import AlignerSettings
from fuseserve.aligner.tokenview import TokenizerView
from fuseserve.errors import StartupError
from fuseserve.wire.grpc_server import Health

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ``serve`` below owns SIGTERM for both servers."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class RunningAligner:
    settings: AlignerSettings
    service: FusionService
    metrics: AlignerMetrics
    grpc_server: grpc.aio.Server
    grpc_port: int
    rest_port: int
    rest_server: _Uvicorn
    health: Health
    tasks: list[asyncio.Task] = field(default_factory=list)
    startup: asyncio.Task | None = None

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait for the teachers (raises what start-up raised, e.g. TeacherUnavailable)."""
        assert self.startup is not None
        await asyncio.wait_for(asyncio.shield(self.startup), timeout_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.set_serving(False)
        self.rest_server.should_exit = True
        for task in self.tasks:
            if task is not self.tasks[0]:
                task.cancel()
        if self.startup is not None:
            self.startup.cancel()
        await self.grpc_server.stop(grace_s)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self.tasks[0], grace_s + 5)
        await self.service.pool.close()
        await self.service.cache.close()


def one_line(exc: BaseException) -> str:
    """An exception as one line: its first line of text, or its type."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given, so that asyncio sees a TCP socket and sets TCP_NODELAY on each connection
    # (with proto 0 it does not, and a response's headers and body, written apart, wait on
    # Nagle and the caller's delayed ACK: 40 ms per response)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def load_target(settings: AlignerSettings):
    """The target tokenizer and its view; a tokenizer that cannot be loaded is a StartupError."""
    from fuseserve.loading import load_tokenizer

    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, settings.target_tokenizer)
        target = await asyncio.to_thread(
            TokenizerView.from_hf, tokenizer, settings.target_tokenizer
        )
    except Exception as exc:
        raise StartupError(
            f"target_tokenizer: cannot load {settings.target_tokenizer!r}: {one_line(exc)}"
        ) from exc
    return tokenizer, target


def build_pool(
    settings: AlignerSettings, tokenizer, target: TokenizerView, metrics: AlignerMetrics
) -> TeacherPool:
    """The teacher pool (not connected yet)."""
    return TeacherPool(settings, target, metrics, hf_first_tokens(tokenizer))


def build_cache(settings: AlignerSettings, metrics: AlignerMetrics):
    """Redis when ``redis_url`` is set, else an in-process LRU; its state feeds a gauge."""
    cache: RedisCache | LRUCache
    if settings.redis_url:
        cache = RedisCache(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout_s=settings.redis_timeout_s,
            retry_s=settings.redis_retry_s,
            ttl_s=settings.cache_ttl_s,
            on_error=lambda op: metrics.cache_errors.labels(op).inc(),
            max_connections=settings.redis_max_connections,
            pool_timeout_s=settings.redis_pool_timeout_s,
        )
    else:
        cache = LRUCache(settings.lru_max_bytes)
    metrics.cache_up.set_function(lambda: float(cache.status() in ("ok", "off")))
    return cache


def build_service(
    settings: AlignerSettings, tokenizer, target, pool, cache, metrics
) -> FusionService:
    return FusionService(settings, tokenizer, target, pool, cache, metrics)


def rest_server(
    settings: AlignerSettings, service: FusionService, metrics: AlignerMetrics
) -> _Uvicorn:
    """uvicorn serving the REST API and the vLLM-compatible routes, behind ``http_guard``."""
    api_key = settings.key()
    app = create_app(
        service,
        metrics,
        settings.target_tokenizer,
        api_key,
        settings.max_body_bytes,
        settings.body_timeout_s,
    )
    model = f"fuseserve/{settings.target_tokenizer}"
    add_openai_routes(app, service, metrics, model, api_key)  # the vLLM-compatible teacher
    http = guarded_http(settings.header_timeout_s, settings.max_connections)
    level = settings.log_level.lower()
    config = uvicorn.Config(app, http=http, log_level=level, access_log=False, lifespan="off")
    return _Uvicorn(config)


async def start_servers(
    settings: AlignerSettings, service: FusionService, metrics: AlignerMetrics, server_tls
) -> RunningAligner:
    """Bind REST and start gRPC (health NOT_SERVING; ``server_tls``: its TLS); a port that
    cannot be bound closes the pool and is a StartupError naming it."""
    pool = service.pool
    servicer = AlignerServicer(
        service, metrics, settings.target_tokenizer, settings.max_stream_inflight
    )
    api_key = settings.key()
    try:
        sock = _bind(settings.host, settings.rest_port)
    except OSError as exc:
        await pool.close()
        raise StartupError(
            f"rest_port: cannot listen on {settings.host}:{settings.rest_port}: {exc.strerror}"
        ) from None
    try:
        grpc_server, grpc_port, health = await start_grpc(
            servicer,
            settings.host,
            settings.grpc_port,
            settings.max_message_bytes,
            api_key,
            server_tls,
        )
    except StartupError as exc:
        sock.close()
        await pool.close()
        raise StartupError(f"grpc_{exc}") from None
    rest = rest_server(settings, service, metrics)
    running = RunningAligner(
        settings, service, metrics, grpc_server, grpc_port, sock.getsockname()[1], rest, health
    )
    running.tasks.append(asyncio.create_task(rest.serve(sockets=[sock])))
    running.tasks.append(asyncio.create_task(sample_loop_lag(metrics.loop_lag)))
    return running


async def connect_teachers(running: RunningAligner) -> None:
    """Wait for every teacher, then serve (health SERVING) and start the periodic refresh and
    health watch."""
    settings, pool, health = running.settings, running.service.pool, running.health
    await pool.start(settings.startup_timeout_s)
    await health.set_serving(True)
    log.info(
        "aligner ready: REST :%d, gRPC :%d, teachers %s",
        running.rest_port,
        running.grpc_port,
        ", ".join(pool.names),
    )
    if settings.info_refresh_s:
        running.tasks.append(asyncio.create_task(pool.refresh_forever(settings.info_refresh_s)))
    if settings.health_interval_s:

        def on_change() -> None:
            asyncio.get_running_loop().create_task(health.set_serving(pool.ready))

        running.tasks.append(
            asyncio.create_task(pool.watch_health(settings.health_interval_s, 2, on_change))
        )


async def start_aligner(settings: AlignerSettings, show_progress: bool = False) -> RunningAligner:
    """Start both servers now; teachers connect in the background (see ``wait_ready``)."""
    metrics = AlignerMetrics()
    tokenizer, target = await load_target(settings)
    server_tls = settings.grpc_credentials()  # unreadable TLS files fail before the pool exists
    pool = build_pool(settings, tokenizer, target, metrics)
    cache = build_cache(settings, metrics)
    service = build_service(settings, tokenizer, target, pool, cache, metrics)
    running = await start_servers(settings, service, metrics, server_tls)
    running.startup = asyncio.create_task(connect_teachers(running))
    return running


async def serve(settings: AlignerSettings) -> int:
    """Run until SIGTERM/SIGINT (exit 0), or until the teachers never come up (exit 1)."""
    running = await start_aligner(settings)
    log.info(
        "aligner listening: REST http://%s:%d (docs at /docs), gRPC %s:%d; waiting for teachers",
        settings.host,
        running.rest_port,
        settings.host,
        running.grpc_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    assert running.startup is not None
    await asyncio.wait({stopper, running.startup}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if running.startup.done() and not running.startup.cancelled() and running.startup.exception():
        log.error("aligner start-up failed: %s", running.startup.exception())
        code = 1
    else:
        await stopper
    log.info("aligner stopping")
    await running.stop()
    return code
