"""The aligner's REST API (FastAPI): fused-distribution queries for people, notebooks and clients.

Covers ``POST /v1/fuse`` (JSON by default, the binary reply of ``wire.fuse_reply`` when the
``Accept`` header asks for it, 406 when it names neither), ``GET /v1/teachers``, ``/healthz``,
``/readyz``, ``/metrics``, the OpenAPI page (``/docs``), the optional bearer API key (constant-time
comparison), the body-size and body-time limits (413, 408), parsing bodies off the event loop,
cancelling a request's work when its caller disconnects, and one mapping of the error hierarchy to
statuses.

Leaves out: the schema (``rest_schema``), rendering (``rest_render``) and the work
(``dataplane.FusionService``); handlers only convert.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from fuseserve import __version__
from fuseserve.aligner.service.dataplane import FusionService
from fuseserve.aligner.service.early_shed import RefuseBeforeParsing
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.aligner.service.rest_render import JSON, Answer, Cut, is_json, negotiate, render
from fuseserve.aligner.service.rest_schema import (
    ERRORS,
    FuseBody,
    FuseResponse,
    add_component_schemas,
    fuse_body_openapi,
    parse_fuse_body,
    validation_error,
)
from fuseserve.errors import InvalidRequest, Overloaded, ServiceError, Unavailable
from fuseserve.wire.fuse_reply import MEDIA_TYPE

STATUS = {InvalidRequest: 422, Overloaded: 429, Unavailable: 503}
T = TypeVar("T")

BEARER = HTTPBearer(auto_error=False, description="the aligner's --api-key")


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate echoed in a message cannot break it."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False).encode()


def envelope(
    status: int, kind: str, message: str, field: str | None = None, headers=None
) -> JSONResponse:
    body: dict[str, Any] = {"error": {"type": kind, "message": message}}
    if field is not None:
        body["error"]["field"] = field
    return SafeJSONResponse(body, status_code=status, headers=headers)


def error_response(exc: ServiceError, retry_after_s: float = 1.0) -> JSONResponse:
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
    field = exc.field if isinstance(exc, InvalidRequest) else None
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if status == 429 else None
    return envelope(status, type(exc).__name__, str(exc), field, headers)


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
                return await self._reject(
                    send,
                    408,
                    "RequestTimeout",
                    f"body: not received within body_timeout_s={self.timeout_s:g}",
                )
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
        await self._reject(
            send, 413, "PayloadTooLarge", f"body: larger than max_body_bytes={self.max_bytes}"
        )

    async def _reject(self, send, status: int, kind: str, message: str) -> None:
        body = json.dumps({"error": {"type": kind, "message": message}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class ClientGone(Exception):
    """The caller disconnected before its answer was ready."""


async def _disconnected(receive) -> None:
    """Return once the ASGI server reports ``http.disconnect`` (the body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(receive, work: Awaitable[T]) -> T:
    """``await work``, cancelling it (and so its teacher calls) if the caller disconnects
    first; then ``ClientGone`` is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watcher.done() and not task.done()
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if gone:
        raise ClientGone
    return task.result()


def early_refusal(
    service: FusionService, metrics: AlignerMetrics, api_key: str | None
) -> Callable[[Mapping[bytes, bytes], bytes], Response | None]:
    """The 429 a request gets before its body is parsed, if the service is that overloaded. A
    body without the bytes ``"teachers"`` cannot name a subset, so it needs every teacher."""
    expected = api_key.encode() if api_key else None

    def refusal(headers: Mapping[bytes, bytes], body: bytes) -> Response | None:
        # an unauthenticated caller gets its 401 from the route, never a hint about load
        token = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
        if expected is not None and not hmac.compare_digest(token, expected):
            return None
        exc = service.refusal_before_parsing(every_teacher=b'"teachers"' not in body)
        if exc is None:
            return None
        metrics.requests.labels("rest", "Overloaded").inc()
        return error_response(exc, exc.retry_after_s)

    return refusal


def key_check(api_key: str | None) -> Callable[..., None]:
    """A dependency wanting ``Authorization: Bearer <api_key>`` (None: no key needed)."""
    expected = api_key.encode() if api_key else None

    def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        if expected is None:
            return
        token = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(token, expected):
            raise _Unauthorized

    return require_key


def add_error_handlers(app: FastAPI, metrics: AlignerMetrics) -> None:
    """Every error as an ``ErrorEnvelope``; caller mistakes never a 500."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        metrics.requests.labels("rest", type(exc).__name__).inc()
        return error_response(exc, getattr(exc, "retry_after_s", 1.0))  # Overloaded has one

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        metrics.requests.labels("rest", "InvalidRequest").inc()
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body": a caller's mistake
            metrics.requests.labels("rest", "InvalidRequest").inc()
            return envelope(422, "InvalidRequest", "body: could not be parsed", "body")
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return envelope(exc.status_code, kind, str(exc.detail), headers=exc.headers)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized):
        return envelope(
            401,
            "Unauthorized",
            "a valid bearer API key is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


FUSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": f"JSON (the default), or with `Accept: {MEDIA_TYPE}` the binary reply "
        "(docs/aligner.md): codec bytes of one FusedBlock per text",
        "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERRORS,
}


def add_fuse_route(
    app: FastAPI, service: FusionService, metrics: AlignerMetrics, target_name: str, require_key
) -> None:
    @app.post(
        "/v1/fuse",
        response_model=FuseResponse,
        dependencies=[Depends(require_key)],
        responses=FUSE_RESPONSES,
        openapi_extra=fuse_body_openapi(),
    )
    async def fuse(request: Request) -> Response:
        """Fused next-token distributions for each text, per target position."""
        start = time.perf_counter()
        kind = negotiate(request.headers.get("accept"))
        if kind is None:
            metrics.requests.labels("rest", "NotAcceptable").inc()
            message = f"Accept: names neither {JSON} nor {MEDIA_TYPE}"
            return envelope(406, "NotAcceptable", message)
        if not is_json(request.headers.get("content-type")):
            metrics.requests.labels("rest", "UnsupportedMediaType").inc()
            message = f"content-type: the body must be {JSON}"
            return envelope(415, "UnsupportedMediaType", message, "content-type")
        # parsing and validating a body of up to max_body_bytes takes tens of milliseconds:
        # keep the event loop (health checks, other requests) free meanwhile
        body: FuseBody = await asyncio.to_thread(parse_fuse_body, await request.body())
        query = service.query(
            body.all_texts(), body.k, body.preset, body.options, body.teachers, body.token_ids
        )
        try:
            results = await cancel_on_disconnect(request.receive, service.fuse(query))
        except ClientGone:
            metrics.requests.labels("rest", "cancelled").inc()
            return Response(status_code=499)  # nobody reads it: the caller is gone
        answer = Answer(
            target_name, service.target.fingerprint, query.k, query.options.model_dump(mode="json")
        )
        cut = Cut(body.top, body.start, body.end)
        tokens = service.target.tokens
        payload = await asyncio.to_thread(
            render, kind, answer, results, tokens, cut, body.float_dtype
        )
        metrics.requests.labels("rest", "ok").inc()
        metrics.request_latency.labels("rest").observe(time.perf_counter() - start)
        media = MEDIA_TYPE if kind == "binary" else JSON
        return Response(payload, media_type=media, headers={"Vary": "Accept"})


def add_info_routes(
    app: FastAPI, service: FusionService, metrics: AlignerMetrics, require_key
) -> None:
    @app.get(
        "/v1/teachers",
        dependencies=[Depends(require_key)],
        responses={401: ERRORS[401]},
    )
    async def teachers() -> list[dict[str, Any]]:
        return [dataclasses.asdict(status) for status in service.teacher_statuses()]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        # the cache is optional (a dead one costs misses, not errors), so it is reported here
        # and in fuseserve_aligner_cache_up but never makes the aligner unready
        ping = getattr(service.cache, "ping", None)
        if ping is not None:
            await ping()
        cache = service.cache.status()
        if service.ready:
            return {"status": "ready", "cache": cache}
        return SafeJSONResponse(
            {"status": "not ready", "teachers": service.problems(), "cache": cache},
            status_code=503,
        )

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}},
    )
    async def prometheus() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    service: FusionService,
    metrics: AlignerMetrics,
    target_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
    body_timeout_s: float = 30.0,
) -> FastAPI:
    app = FastAPI(
        title="fuseserve aligner",
        version=__version__,
        description="Fused next-token distributions from several LLMs on one target vocabulary. "
        "With an API key set, /v1/* need `Authorization: Bearer <key>`; /healthz, /readyz and "
        "/metrics never do. Every error response is an ErrorEnvelope.",
    )
    # added first, so it runs inside BodyLimit: the body is read, nothing is parsed yet
    app.add_middleware(
        RefuseBeforeParsing, path="/v1/fuse", refusal=early_refusal(service, metrics, api_key)
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    require_key = key_check(api_key)
    add_error_handlers(app, metrics)
    add_fuse_route(app, service, metrics, target_name, require_key)
    add_info_routes(app, service, metrics, require_key)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = app.openapi_schema
        if schema is None:  # the fuse body is read by hand: add its schema once
            schema = generate()  # FastAPI keeps it as app.openapi_schema
            add_component_schemas(schema, FuseBody)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
    return app


class _Unauthorized(Exception):
    pass
