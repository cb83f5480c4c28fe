"""The aligner's REST API (FastAPI): fused-distribution queries for people, notebooks and clients.

Covers ``POST /v1/fuse`` (JSON by default, the binary reply of ``wire.fuse_reply`` when the
``Accept`` header asks for it, 406 when it names neither), ``GET /v1/teachers``, ``/healthz``,
``/readyz``, ``/metrics``, the OpenAPI page (``/docs``), the optional bearer API key (constant-time
comparison), parsing bodies off the event loop, cancelling a request's work when its caller
disconnects, and answering every error with its class's status (``http_errors``).

Leaves out: the schema (``rest_schema``), rendering (``rest_render``), the body limits
(``body_limit``) and the work (``dataplane.FusionService``); handlers only convert.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from fuseserve import __version__
from fuseserve.aligner.service.body_limit import BodyLimit
from fuseserve.aligner.service.dataplane import FusionService
from fuseserve.aligner.service.early_shed import RefuseBeforeParsing
from fuseserve.aligner.service.http_errors import envelope, error_response
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
from fuseserve.errors import (
    InvalidRequest,
    NotAcceptable,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)
from fuseserve.wire.fuse_reply import MEDIA_TYPE

T = TypeVar("T")

BEARER = HTTPBearer(auto_error=False, description="the aligner's --api-key")


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
        return error_response(exc)

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
            raise Unauthorized("a valid bearer API key is required")

    return require_key


def add_error_handlers(app: FastAPI, metrics: AlignerMetrics) -> None:
    """Every error as an ``ErrorEnvelope`` with its class's status; caller mistakes never a 500."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        metrics.requests.labels("rest", type(exc).__name__).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return await _service_error(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body": a caller's mistake
            return await _service_error(request, InvalidRequest("body", "could not be parsed"))
        kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        body = envelope(kind, str(exc.detail))
        return Response(body, exc.status_code, exc.headers, media_type=JSON)


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
            raise NotAcceptable(f"Accept: names neither {JSON} nor {MEDIA_TYPE}")
        if not is_json(request.headers.get("content-type")):
            raise UnsupportedMediaType("content-type", f"the body must be {JSON}")
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
        body = {"status": "not ready", "teachers": service.problems(), "cache": cache}
        return Response(json.dumps(body, ensure_ascii=True), 503, media_type=JSON)

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
