"""The aligner's REST API (FastAPI): fused-distribution queries for people and notebooks.

Covers ``POST /v1/fuse`` (per target position: the token, its top fused candidates for the next
token, the teacher chosen there; per teacher: CE and coverage), ``GET /v1/teachers``, ``/healthz``,
``/readyz``, ``/metrics``, the OpenAPI page (``/docs``), the optional bearer API key (constant-time
comparison), the body-size limit (413), and one mapping of the error hierarchy to statuses.

Leaves out: the work itself (``dataplane.FusionService``); handlers only convert.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import math
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from fuseserve import __version__
from fuseserve.aligner.service.dataplane import BlockResult, FusionService
from fuseserve.aligner.service.early_shed import RefuseBeforeParsing
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.errors import InvalidRequest, Overloaded, ServiceError, Unavailable

STATUS = {InvalidRequest: 422, Overloaded: 429, Unavailable: 503}


NonEmptyText = Annotated[str, Field(min_length=1)]


class FuseBody(BaseModel):
    """A fuse query: one text or a few, and optional overrides of the service defaults.

    Types are strict: ``k: "3"`` or ``k: true`` is a 422, not a 3 or a 1."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: NonEmptyText | None = Field(None, description="one text block (or use texts)")
    texts: list[NonEmptyText] | None = Field(
        None, min_length=1, description="several text blocks (at least one)"
    )
    k: int | None = Field(None, ge=1, le=1024, description="top-k asked of each teacher")
    preset: Literal["default", "spans", "fusellm"] | None = None
    options: dict[str, Any] | None = Field(None, description="FusionOptions field overrides")
    teachers: list[str] | None = Field(None, description="a subset of teachers by name")
    top: int = Field(5, ge=1, le=100, description="fused candidates shown per position")

    @model_validator(mode="after")
    def _one_of(self) -> FuseBody:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' and 'texts'")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class ErrorDetail(BaseModel):
    type: str = Field(description="InvalidRequest, Overloaded, Unavailable, Unauthorized, ...")
    message: str = Field(description="what is wrong, starting with the field when there is one")
    field: str | None = Field(None, description="the request field at fault (422 only)")


class ErrorEnvelope(BaseModel):
    """Every error response of the API (4xx and 5xx) has this shape."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorEnvelope, "description": "missing or wrong bearer API key"},
    408: {"model": ErrorEnvelope, "description": "the body did not arrive within body_timeout_s"},
    413: {"model": ErrorEnvelope, "description": "body larger than max_body_bytes"},
    422: {
        "model": ErrorEnvelope,
        "description": "invalid request: bad JSON, invalid UTF-8, JSON nested too deeply, a wrong "
        "type or value, a text over max_text_chars / max_text_bytes / max_block_tokens, or a "
        "text that is not valid Unicode; error.field names the field (e.g. texts[2])",
    },
    429: {
        "model": ErrorEnvelope,
        "description": "overloaded: retry after the Retry-After header (seconds)",
    },
    503: {"model": ErrorEnvelope, "description": "a teacher is down or not ready (named)"},
}


class Candidate(BaseModel):
    id: int
    token: str
    prob: float


class Position(BaseModel):
    position: int
    id: int
    token: str
    text: str = Field(description="the characters this target token covers")
    chosen: str | None = Field(description="teacher whose distribution was used (None: averaged)")
    candidates: list[Candidate] = Field(description="fused distribution of the next token")
    tail: float = Field(
        0.0,
        description="probability of the next token that is on none of the fused ids (the "
        "teacher's mass outside its top-k; 0 where the preset renormalises)",
    )


class TeacherScore(BaseModel):
    name: str
    ce: float | None = Field(
        description="the teacher's cross-entropy on this block (nats/token; null if undefined)"
    )
    coverage: float = Field(description="fraction of labelled target positions aligned")


class Block(BaseModel):
    index: int
    cache_hit: bool
    teachers: list[TeacherScore]
    positions: list[Position]


class FuseResponse(BaseModel):
    target_tokenizer: str
    k: int
    options: dict[str, Any]
    blocks: list[Block]


def block_json(index: int, result: BlockResult, tokens: tuple[str, ...], top: int) -> dict:
    """One block as the ``Block`` schema, built with whole-array operations (2048 positions)."""
    block = result.block
    names = block.teachers
    order = np.argsort(-block.probs, axis=1, kind="stable")[:, :top]
    top_ids = np.take_along_axis(block.ids, order, axis=1).tolist()
    top_p = np.take_along_axis(block.probs, order, axis=1).tolist()
    chosen = [names[c] if 0 <= c < len(names) else None for c in block.chosen.tolist()]
    tails = block.tail.tolist()
    text = result.text
    positions = [
        {
            "position": i,
            "id": tid,
            "token": tokens[tid],
            "text": text[start:end],
            "chosen": chosen[i],
            "candidates": [
                {"id": c, "token": tokens[c], "prob": p}
                for c, p in zip(top_ids[i], top_p[i])
                if c >= 0
            ],
            "tail": tails[i],
        }
        for i, (tid, (start, end)) in enumerate(
            zip(block.target_ids.tolist(), result.offsets.tolist())
        )
    ]
    teachers = [
        {"name": n, "ce": c if math.isfinite(c) else None, "coverage": v}
        for n, c, v in zip(names, block.ce.tolist(), block.coverage.tolist())
    ]
    return {
        "index": index,
        "cache_hit": result.cache_hit,
        "teachers": teachers,
        "positions": positions,
    }


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


def field_path(loc) -> str:
    """A pydantic error location as the field people write: ``texts[2]``, ``options.x``."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def parse_error(exc: BaseException | None) -> str:
    """Why FastAPI could not read a JSON body (it raises a bare 400 for these)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {exc.start}: {exc.reason})"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return "could not be parsed as a JSON object"


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
    expected = api_key.encode() if api_key else None

    def refusal(headers: Mapping[bytes, bytes]) -> Response | None:
        # an unauthenticated caller gets its 401 from the route, never a hint about load
        token = headers.get(b"authorization", b"").removeprefix(b"Bearer ").strip()
        if expected is not None and not hmac.compare_digest(token, expected):
            return None
        exc = service.refusal_before_parsing()
        if exc is None:
            return None
        metrics.requests.labels("rest", "Overloaded").inc()
        return error_response(exc, exc.retry_after_s)

    # added first, so it runs inside BodyLimit: the body is read, nothing is parsed yet
    app.add_middleware(RefuseBeforeParsing, path="/v1/fuse", refusal=refusal)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)

    def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        if expected is None:
            return
        token = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(token, expected):
            raise _Unauthorized

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        metrics.requests.labels("rest", type(exc).__name__).inc()
        return error_response(exc, getattr(exc, "retry_after_s", 1.0))  # Overloaded has one

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        field = field_path(first.get("loc", ()))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            at = next((p for p in first.get("loc", ()) if isinstance(p, int)), None)
            field, message = "body", f"not valid JSON ({first.get('ctx', {}).get('error', '')}"
            message += f" at character {at})" if at is not None else ")"
        elif first.get("type") == "string_unicode":
            message = "not valid Unicode (a lone surrogate?); send UTF-8 text"
        metrics.requests.labels("rest", "InvalidRequest").inc()
        return envelope(422, "InvalidRequest", f"{field}: {message}", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body": a caller's mistake
            metrics.requests.labels("rest", "InvalidRequest").inc()
            message = "body: " + parse_error(exc.__cause__)
            return envelope(422, "InvalidRequest", message, "body")
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

    @app.post(
        "/v1/fuse",
        response_model=FuseResponse,
        dependencies=[Depends(require_key)],
        responses=ERRORS,
    )
    async def fuse(body: FuseBody) -> Response:
        """Fused next-token distributions for each text, per target position."""
        start = time.perf_counter()
        query = service.query(body.all_texts(), body.k, body.preset, body.options, body.teachers)
        results = await service.fuse(query)
        tokens = service.target.tokens

        def render() -> bytes:
            return json.dumps(
                {
                    "target_tokenizer": target_name,
                    "k": query.k,
                    "options": query.options.model_dump(mode="json"),
                    "blocks": [block_json(i, r, tokens, body.top) for i, r in enumerate(results)],
                },
                ensure_ascii=False,
                allow_nan=False,
            ).encode()

        # large blocks take milliseconds to render: keep the event loop free meanwhile
        payload = await asyncio.to_thread(render)
        metrics.requests.labels("rest", "ok").inc()
        metrics.request_latency.labels("rest").observe(time.perf_counter() - start)
        return Response(payload, media_type="application/json")

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

    return app


class _Unauthorized(Exception):
    pass
