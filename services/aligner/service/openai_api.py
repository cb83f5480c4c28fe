"""The aligner as a vLLM-compatible teacher: ``GET /health``, ``GET /v1/models`` and
``POST /v1/completions`` with ``prompt_logprobs``, on the aligner's REST port.

This is what TRL's ``VLLMClient.get_sequence_logprobs`` (and so its served-teacher trainers)
speaks: ``prompt`` = token-id lists of the *target* (student) vocabulary, ``prompt_logprobs`` = K;
the answer's ``choices[i].prompt_logprobs`` is, per position, the fused distribution of every
configured teacher (``openai_logprobs``: top-K entries, the actual token always present, vLLM's
ranks, ``temperature`` applied to the fused rows).

Decisions: the rows are always fused with the ``spans`` preset (with the service's option
overrides): it is the one that gives the actual next token its chain-rule probability at every
position (other presets renormalise top-k rows without a tail, so an unlisted actual token would
get probability 0). The service scores, it does not generate: ``max_tokens`` may be 0, 1 or
absent and the completion is always empty (``text`` "", ``finish_reason`` "length", no
completion tokens); ``max_tokens`` > 1, ``n`` > 1 and ``stream`` are refused (400 naming the
field). ``logprobs`` (of generated tokens) is accepted and answers an empty list. A string
prompt is tokenised with the target tokenizer. ``temperature`` must be > 0 (absent: 1). A
one-token prompt has nothing to score: its ``prompt_logprobs`` is ``[null]``. The ``model``
named must be the one ``/v1/models`` lists (else 404). Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 for the caller's mistakes (``param``
names the field: ``prompt[2][7]``), 401 without the bearer key (when the service has one), 429
with ``Retry-After`` when shedding load, 503 naming a teacher that is down. Counted in
``fuseserve_aligner_requests_total{transport="openai"}``, and each position answered in
``fuseserve_aligner_openai_positions_total{actual}`` (listed / tail / zero).

Leaves out: the fusing (``dataplane.FusionService``), the numbers (``openai_logprobs``) and the
rest of the REST API (``rest``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from fuseserve.aligner.service.dataplane import BlockResult, FusionService, check_token_ids
from fuseserve.aligner.service.http_errors import error_headers
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.aligner.service.openai_logprobs import prompt_logprobs, render_json
from fuseserve.aligner.service.rest import ClientGone, cancel_on_disconnect
from fuseserve.aligner.service.rest_schema import field_path
from fuseserve.errors import InvalidRequest, ServiceError, Unauthorized, UnknownModel
from fuseserve.wire.requests import FuseCall

JSON = "application/json"
# the preset whose rows always give the actual next token its chain-rule probability (the
# service's option overrides still apply)
PRESET = "spans"


class CompletionBody(BaseModel):
    """The fields of vLLM's completion request that this endpoint reads; others are ignored, as
    OpenAI-compatible servers do. ``prompt`` is checked by hand (``prompt_sequences``)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Any = None
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    prompt_logprobs: StrictInt | None = None
    logprobs: StrictInt | None = Field(None, ge=0)
    n: StrictInt = 1
    stream: StrictBool | None = False


# OpenAI's error type for each status it answers (its client raises one class per status)
OPENAI_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}


@dataclass(frozen=True)
class OpenAIError:
    """A service error as OpenAI's API answers it."""

    status: int
    kind: str
    message: str
    param: str | None


def error_body(status: int, kind: str, message: str, param: str | None) -> bytes:
    error = {"message": message, "type": kind, "param": param, "code": status}
    return json.dumps({"error": error}, ensure_ascii=True).encode()


def as_openai(exc: ServiceError, single: bool = False) -> OpenAIError:
    """A service error as the OpenAI error it is: its class's status (the caller's mistakes,
    422 in the REST API, are OpenAI's 400) and the type OpenAI gives that status; a field of
    the ids path renamed to ``prompt``."""
    status = 400 if exc.http_status == 422 else exc.http_status
    kind = OPENAI_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    if exc.field is None:
        return OpenAIError(status, kind, str(exc), None)
    param = prompt_field(exc.field, single)
    return OpenAIError(status, kind, str(exc).replace(exc.field, param, 1), param)


def prompt_field(field: str, single: bool) -> str:
    """``token_ids[0][7]`` -> ``prompt[0][7]`` (``prompt[7]`` for a single id list)."""
    if field == "k":
        return "prompt_logprobs"
    if not field.startswith("token_ids"):
        return field
    rest = field[len("token_ids") :]
    if single and rest.startswith("[0]"):
        rest = rest[len("[0]") :]
    return "prompt" + rest


def parse_body(raw: bytes) -> CompletionBody:
    """Bytes -> a ``CompletionBody``, or ``InvalidRequest`` naming the field."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest("body", f"not a JSON document ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise InvalidRequest("body", "must be a JSON object")
    try:
        return CompletionBody.model_validate(document)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise InvalidRequest(field_path(first.get("loc", ())), first.get("msg", "")) from None


def check_options(body: CompletionBody) -> None:
    """What this endpoint does not do, refused by name (see the module docstring)."""
    if body.max_tokens is not None and body.max_tokens > 1:
        raise InvalidRequest(
            "max_tokens",
            f"{body.max_tokens}: this server scores prompts and generates nothing; send 0 or 1",
        )
    if body.n != 1:
        raise InvalidRequest("n", "only n = 1 is served")
    if body.stream:
        raise InvalidRequest("stream", "streaming is not served")
    if body.temperature is not None and body.temperature <= 0:
        raise InvalidRequest("temperature", "must be > 0 to score with (or absent: 1)")
    if body.prompt_logprobs is not None and body.prompt_logprobs < 0:
        raise InvalidRequest(
            "prompt_logprobs",
            f"{body.prompt_logprobs}: must be >= 0 (the whole vocabulary, -1, is not served: "
            "the fused distribution lists a few entries and a tail)",
        )


def is_single(prompt: Any) -> bool:
    """A prompt that is one sequence (a text, or a list of ids), not a list of them."""
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], list | str)
    )


async def prompt_sequences(prompt: Any, service: FusionService) -> list[list[int]]:
    """The prompt as validated id lists (``InvalidRequest`` naming ``token_ids[i][j]``)."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
    ):
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        for i, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"token_ids[{i}]", "must be a non-empty string")
        return await service.encode(texts)
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("prompt", "must be a list of token ids, a list of such lists, or text")
    rows = [prompt] if is_single(prompt) else prompt
    settings, size = service.settings, service.target.vocab_size
    checked = check_token_ids(
        rows, size, settings.max_prompts, settings.max_block_tokens, 1, "max_prompts"
    )
    return [row.tolist() for row in checked]


async def fuse_sequences(
    service: FusionService, rows: list[list[int]], k: int | None, request: Request
) -> list[BlockResult | None]:
    """Fused blocks of every row of two or more ids (None for a one-id row; every row when
    ``k`` is None: nothing asked), in queries of the service's ``max_texts``, all answered at
    once as one request; a caller that leaves cancels them."""
    scored = [i for i, row in enumerate(rows) if len(row) > 1] if k is not None else []
    step = max(1, service.settings.max_texts)
    chunks = [scored[at : at + step] for at in range(0, len(scored), step)]
    calls = [
        FuseCall("", (), k=k, preset=PRESET, token_ids=tuple(tuple(rows[i]) for i in chunk))
        for chunk in chunks
    ]
    answers = await cancel_on_disconnect(request.receive, service.answer_all(calls, "openai"))
    out: list[BlockResult | None] = [None] * len(rows)
    for chunk, answer in zip(chunks, answers):
        for i, result in zip(chunk, answer.blocks):
            out[i] = result
    return out


def choice_json(
    index: int,
    result: BlockResult | None,
    body: CompletionBody,
    service: FusionService,
    sources: Counter[str],
) -> str:
    """One choice of the answer, as JSON text; ``sources`` counts where each position's actual
    token probability came from."""
    logprobs = "null"
    if body.logprobs is not None:
        logprobs = '{"text_offset":[],"token_logprobs":[],"tokens":[],"top_logprobs":[]}'
    prompt = "null"
    if body.prompt_logprobs is not None:
        prompt = "[null]"
        if result is not None:
            temperature = 1.0 if body.temperature is None else float(body.temperature)
            view = service.target
            top = body.prompt_logprobs
            answer = prompt_logprobs(result.block, top, temperature, view)
            sources.update(answer.sources())
            prompt = render_json(answer, view)
    return (
        f'{{"index":{index},"text":"","logprobs":{logprobs},"finish_reason":"length",'
        f'"stop_reason":null,"prompt_logprobs":{prompt}}}'
    )


def completion_json(
    body: CompletionBody,
    rows: list[list[int]],
    results: list[BlockResult | None],
    service: FusionService,
    model: str,
    sources: Counter[str],
) -> bytes:
    """The whole answer (vLLM's ``CompletionResponse``) as bytes; CPU-bound."""
    choices = ",".join(choice_json(i, r, body, service, sources) for i, r in enumerate(results))
    tokens = sum(len(r) for r in rows)
    usage = f'{{"prompt_tokens":{tokens},"total_tokens":{tokens},"completion_tokens":0}}'
    head = (
        f'{{"id":"cmpl-{uuid.uuid4().hex}","object":"text_completion",'
        f'"created":{int(time.time())},"model":{json.dumps(model)},'
    )
    return (head + f'"choices":[{choices}],"usage":{usage}}}').encode()


class OpenAIRoutes:
    """The three routes over one ``FusionService``; ``model``: the name ``/v1/models`` lists."""

    def __init__(
        self, service: FusionService, metrics: AlignerMetrics, model: str, api_key: str | None
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.model = model
        self.key = api_key.encode() if api_key else None

    def error(self, exc: ServiceError, single: bool = False) -> Response:
        answer = as_openai(exc, single)
        self.metrics.requests.labels("openai", answer.kind).inc()
        payload = error_body(answer.status, answer.kind, answer.message, answer.param)
        headers = error_headers(exc) or None
        return Response(payload, status_code=answer.status, media_type=JSON, headers=headers)

    def check_key(self, request: Request) -> None:
        if self.key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.key):
            raise Unauthorized("a valid bearer API key is required")

    async def health(self) -> Response:
        if self.service.ready:
            return Response(status_code=200)
        problems = "; ".join(f"{k}: {v}" for k, v in self.service.problems().items())
        return Response(
            error_body(503, "ServiceUnavailableError", f"not ready: {problems}", None),
            status_code=503,
            media_type=JSON,
        )

    async def models(self, request: Request) -> Response:
        try:
            self.check_key(request)
        except Unauthorized as exc:
            return self.error(exc)
        card = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "fuseserve",
            "root": self.model,
            "parent": None,
            "max_model_len": self.service.settings.max_block_tokens,
            "permission": [],
        }
        return Response(json.dumps({"object": "list", "data": [card]}), media_type=JSON)

    async def completions(self, request: Request) -> Response:
        single = False
        try:
            self.check_key(request)
            body = await asyncio.to_thread(parse_body, await request.body())
            check_options(body)
            if body.model is not None and body.model != self.model:
                raise UnknownModel(body.model)
            single = is_single(body.prompt)
            rows = await prompt_sequences(body.prompt, self.service)
            k = None  # no prompt_logprobs: nothing to fuse (still answered, and counted, as one)
            if body.prompt_logprobs is not None:
                k = max(body.prompt_logprobs, self.service.settings.k)
            results = await fuse_sequences(self.service, rows, k, request)
            sources: Counter[str] = Counter()
            payload = await asyncio.to_thread(
                completion_json, body, rows, results, self.service, self.model, sources
            )
            for source, count in sources.items():
                self.metrics.openai_positions.labels(source).inc(count)
        except ClientGone:  # counted by the data plane
            return Response(status_code=499)
        except ServiceError as exc:
            return self.error(exc, single)
        return Response(payload, media_type=JSON)


def add_openai_routes(
    app: FastAPI, service: FusionService, metrics: AlignerMetrics, model: str, api_key: str | None
) -> None:
    """Mount ``/health``, ``/v1/models`` and ``/v1/completions`` on ``app``."""
    routes = OpenAIRoutes(service, metrics, model, api_key)
    # not in the aligner's OpenAPI spec: their contract is vLLM's (docs/aligner.md)
    for path, handler, method in (
        ("/health", routes.health, "GET"),
        ("/v1/models", routes.models, "GET"),
        ("/v1/completions", routes.completions, "POST"),
    ):
        app.add_api_route(path, handler, methods=[method], include_in_schema=False)
