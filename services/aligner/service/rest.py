"""The aligner's REST API (FastAPI): fused-distribution queries for people and notebooks.

Covers ``POST /v1/fuse`` (per target position: the token, its top fused candidates for the next
token, the teacher chosen there; per teacher: CE and coverage), ``GET /v1/teachers``, ``/healthz``,
``/readyz``, ``/metrics``, the OpenAPI page (``/docs``), the optional bearer API key (constant-time
comparison), the body-size limit (413), and one mapping of the error hierarchy to statuses.

Leaves out: the work itself (``dataplane.FusionService``); handlers only convert.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fuseserve import __version__
from fuseserve.aligner.service.dataplane import BlockResult, FusionService
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.errors import InvalidRequest, Overloaded, ServiceError, Unavailable

STATUS = {InvalidRequest: 422, Overloaded: 429, Unavailable: 503}


class FuseBody(BaseModel):
    """A fuse query: one text or a few, and optional overrides of the service defaults."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="one text block (or use texts)")
    texts: list[str] | None = Field(None, description="several text blocks")
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


def error_response(exc: ServiceError) -> JSONResponse:
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
    body = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    if isinstance(exc, InvalidRequest):
        body["error"]["field"] = exc.field
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 before any handler sees them."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send) -> None:
        body = (
            b'{"error":{"type":"PayloadTooLarge","message":"body: larger than max_body_bytes='
            + str(self.max_bytes).encode()
            + b'"}}'
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(
    service: FusionService,
    metrics: AlignerMetrics,
    target_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
) -> FastAPI:
    app = FastAPI(
        title="fuseserve aligner",
        version=__version__,
        description="Fused next-token distributions from several LLMs on one target vocabulary.",
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    expected = api_key.encode() if api_key else None

    def require_key(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected):
            raise _Unauthorized

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        metrics.requests.labels("rest", type(exc).__name__).inc()
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"] if errors else []
        field = ".".join(loc) or "body"
        message = errors[0].get("msg", "invalid request") if errors else "invalid request"
        metrics.requests.labels("rest", "InvalidRequest").inc()
        return JSONResponse(
            {
                "error": {
                    "type": "InvalidRequest",
                    "field": field,
                    "message": f"{field}: {message}",
                },
                "detail": [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors],
            },
            status_code=422,
        )

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized):
        return JSONResponse(
            {"error": {"type": "Unauthorized", "message": "a valid bearer API key is required"}},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.post(
        "/v1/fuse",
        response_model=FuseResponse,
        dependencies=[Depends(require_key)],
        responses={413: {"description": "body larger than max_body_bytes"}},
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

    @app.get("/v1/teachers", dependencies=[Depends(require_key)])
    async def teachers() -> list[dict[str, Any]]:
        out = []
        for name, t in service.pool.teachers.items():
            info = t.info
            out.append(
                {
                    "name": name,
                    "addresses": list(t.addresses),
                    "ready": t.ready,
                    "problem": t.problem or None,
                    "model_id": info.model_id if info else None,
                    "backend": info.backend if info else None,
                    "tokenizer_fingerprint": t.view.fingerprint if t.view else None,
                    "vocab_size": t.view.vocab_size if t.view else None,
                    "max_k": t.max_k,
                    "vocab_map_exact_fraction": (
                        t.vocab_map.exact_fraction if t.vocab_map else None
                    ),
                }
            )
        return out

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if service.ready:
            return {"status": "ready"}
        return JSONResponse(
            {"status": "not ready", "teachers": service.problems()}, status_code=503
        )

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _Unauthorized(Exception):
    pass
