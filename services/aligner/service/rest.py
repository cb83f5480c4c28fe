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
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from fuseserve import __version__
from fuseserve.aligner.service.body_limit import BodyLimit
from fuseserve.aligner.service.dataplane import FusionService
from fuseserve.aligner.service.early_shed import RefuseBeforeParsing
from fuseserve.aligner.service.http_errors import envelope, error_response
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.aligner.service.rest_render import JSON, Cut, is_json, negotiate, render
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


async def service_error(request: Request, exc: ServiceError) -> Response:
    """Every service error as an ``ErrorEnvelope`` with its class's status, counted."""
    request.app.state.metrics.requests.labels("rest", type(exc).__name__).inc()
    return error_response(exc)


async def request_invalid(request: Request, exc: RequestValidationError) -> Response:
    return await service_error(request, validation_error(list(exc.errors())))


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Starlette's own errors in the envelope; caller mistakes never a 500."""
    if exc.status_code == 400:  # FastAPI's "error parsing the body": a caller's mistake
        return await service_error(request, InvalidRequest("body", "could not be parsed"))
    kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
    return Response(envelope(kind, str(exc.detail)), exc.status_code, exc.headers, media_type=JSON)


FUSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": f"JSON (the default), or with `Accept: {MEDIA_TYPE}` the binary reply "
        "(docs/aligner.md): codec bytes of one FusedBlock per text",
        "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERRORS,
}


async def fuse(request: Request) -> Response:
    """Fused next-token distributions for each text, per target position."""
    state = request.app.state
    kind = negotiate(request.headers.get("accept"))
    if kind is None:
        raise NotAcceptable(f"Accept: names neither {JSON} nor {MEDIA_TYPE}")
    if not is_json(request.headers.get("content-type")):
        raise UnsupportedMediaType("content-type", f"the body must be {JSON}")
    # parsing and validating a body of up to max_body_bytes takes tens of milliseconds:
    # keep the event loop (health checks, other requests) free meanwhile
    body: FuseBody = await asyncio.to_thread(parse_fuse_body, await request.body())
    service: FusionService = state.service
    try:
        answer = await cancel_on_disconnect(request.receive, service.answer(body.call(), "rest"))
    except ClientGone:  # counted by the data plane
        return Response(status_code=499)  # nobody reads it: the caller is gone
    cut = Cut(body.top, body.start, body.end)
    tokens = service.target.tokens
    payload = await asyncio.to_thread(
        render, kind, answer, state.target_name, tokens, cut, body.float_dtype
    )
    media = MEDIA_TYPE if kind == "binary" else JSON
    return Response(payload, media_type=media, headers={"Vary": "Accept"})


async def teachers(request: Request) -> list[dict[str, Any]]:
    return [dataclasses.asdict(status) for status in request.app.state.service.teacher_statuses()]


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readyz(request: Request) -> Response:
    # the cache is optional (a dead one costs misses, not errors), so it is reported here
    # and in fuseserve_aligner_cache_up but never makes the aligner unready
    service: FusionService = request.app.state.service
    await service.cache.ping()
    cache = service.cache.status()
    if service.ready:
        return JSONResponse({"status": "ready", "cache": cache})
    body = {"status": "not ready", "teachers": service.problems(), "cache": cache}
    return Response(json.dumps(body, ensure_ascii=True), 503, media_type=JSON)


async def prometheus(request: Request) -> PlainTextResponse:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = request.app.state.metrics.registry
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def add_routes(app: FastAPI, require_key) -> None:
    """Mount the routes above (``require_key`` on ``/v1/*``)."""
    keyed = [Depends(require_key)]
    app.add_api_route(
        "/v1/fuse", fuse, methods=["POST"], response_model=FuseResponse, dependencies=keyed,
        responses=FUSE_RESPONSES, openapi_extra=fuse_body_openapi(),
    )  # fmt: skip
    app.add_api_route(
        "/v1/teachers", teachers, methods=["GET"], dependencies=keyed,
        responses={401: ERRORS[401]},
    )  # fmt: skip
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    prometheus_text: dict[int | str, dict[str, Any]] = {
        200: {"content": {"text/plain": {}}, "description": "Prometheus text"}
    }
    app.add_api_route(
        "/metrics", prometheus, methods=["GET"], response_class=PlainTextResponse,
        responses=prometheus_text,
    )  # fmt: skip


def create_app(
    service: FusionService,
    metrics: AlignerMetrics,
    target_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
    body_timeout_s: float = 30.0,
) -> FastAPI:
    """The REST app over ``service`` (kept in ``app.state`` with the metrics and the target
    tokenizer's name, where the module-level routes find them)."""
    app = FastAPI(
        title="fuseserve aligner",
        version=__version__,
        description="Fused next-token distributions from several LLMs on one target vocabulary. "
        "With an API key set, /v1/* need `Authorization: Bearer <key>`; /healthz, /readyz and "
        "/metrics never do. Every error response is an ErrorEnvelope.",
    )
    app.state.service, app.state.metrics, app.state.target_name = service, metrics, target_name
    # added first, so it runs inside BodyLimit: the body is read, nothing is parsed yet
    app.add_middleware(
        RefuseBeforeParsing, path="/v1/fuse", refusal=early_refusal(service, metrics, api_key)
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_exception_handler(ServiceError, service_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, request_invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    add_routes(app, key_check(api_key))
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = app.openapi_schema
        if schema is None:  # the fuse body is read by hand: add its schema once
            schema = generate()  # FastAPI keeps it as app.openapi_schema
            add_component_schemas(schema, FuseBody)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
    return app
