"""The REST API's schema: the fuse request body, the JSON answer, the error envelope.

Covers the pydantic models that the OpenAPI spec shows (``FuseBody``, ``FuseResponse``,
``ErrorEnvelope``), the documented error statuses of ``POST /v1/fuse``, and ``parse_fuse_body``:
raw body bytes -> a validated ``FuseBody`` or ``InvalidRequest`` naming the field (pure and
CPU-bound, so the adapter runs it in a worker thread: a 7.8 MB body never blocks the event loop).

Leaves out: HTTP itself (``rest``) and rendering answers (``rest_render``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fuseserve.errors import InvalidRequest
from fuseserve.wire.fuse_reply import MEDIA_TYPE
from fuseserve.wire.requests import FuseCall

NonEmptyText = Annotated[str, Field(min_length=1)]


class FuseBody(BaseModel):
    """A fuse query: one text or a few, and optional overrides of the service defaults.

    Types are strict: ``k: "3"`` or ``k: true`` is a 422, not a 3 or a 1."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: NonEmptyText | None = Field(None, description="one text block (or use texts)")
    texts: list[NonEmptyText] | None = Field(
        None, min_length=1, description="several text blocks (at least one)"
    )
    token_ids: list[list[int]] | None = Field(
        None,
        min_length=1,
        description="target token ids instead of texts, one list per block (exactly one of "
        "text, texts, token_ids): the text is rebuilt from the ids, never re-tokenised",
    )
    k: int | None = Field(None, ge=1, le=1024, description="top-k asked of each teacher")
    preset: Literal["default", "spans", "fusellm"] | None = None
    options: dict[str, Any] | None = Field(None, description="FusionOptions field overrides")
    teachers: list[str] | None = Field(
        None, min_length=1, description="a subset of teachers by name (omit it for all)"
    )
    top: int | None = Field(
        5, ge=1, le=1024, description="fused candidates kept per position (null: all of them)"
    )
    start: int = Field(0, ge=0, description="first position returned (clamped to the block)")
    end: int | None = Field(
        None, ge=1, description="position after the last one returned (null: the block's end)"
    )
    float_dtype: Literal["f16", "f32"] = Field(
        "f16", description=f"probabilities in a {MEDIA_TYPE} answer (JSON: always full)"
    )

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: int | None, info: ValidationInfo) -> int | None:
        start = info.data.get("start", 0)
        if end is not None and end <= start:
            raise ValueError(f"must be greater than start ({start})")
        return end

    @model_validator(mode="after")
    def _one_of(self) -> FuseBody:
        given = [self.text, self.texts, self.token_ids]
        if sum(value is not None for value in given) != 1:
            raise ValueError("give exactly one of 'text', 'texts' and 'token_ids'")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])

    def call(self) -> FuseCall:
        """The request as the data plane takes it (the cut, ``top``/``start``/``end``, and the
        binary answer's ``float_dtype`` stay with the REST adapter)."""
        return FuseCall(
            id="",
            texts=tuple(self.all_texts()),
            k=self.k,
            preset=self.preset,
            options=self.options,
            teachers=tuple(self.teachers) if self.teachers else None,
            token_ids=self.token_ids,  # type: ignore[arg-type]  # lists: read, never changed
        )


class ErrorDetail(BaseModel):
    type: str = Field(description="InvalidRequest, Overloaded, Unavailable, Unauthorized, ...")
    message: str = Field(description="what is wrong, starting with the field when there is one")
    field: str | None = Field(
        None, description="the request field at fault (422; 413: body; 415: content-type)"
    )


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
    415: {"model": ErrorEnvelope, "description": "a Content-Type other than application/json"},
    406: {
        "model": ErrorEnvelope,
        "description": f"the Accept header names neither application/json nor {MEDIA_TYPE}",
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
    start: int = Field(description="the first position listed (the request's start, clamped)")
    cache_hit: bool
    teachers: list[TeacherScore]
    positions: list[Position]


class FuseResponse(BaseModel):
    target_tokenizer: str
    target_fingerprint: str
    k: int
    options: dict[str, Any]
    blocks: list[Block]


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


def validation_error(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """The first pydantic error as an ``InvalidRequest`` naming its field."""
    first = errors[0] if errors else {}
    field = field_path(first.get("loc", ()))
    message = first.get("msg", "invalid request")
    if first.get("type") == "string_unicode":
        message = "not valid Unicode (a lone surrogate?); send UTF-8 text"
    return InvalidRequest(field, message)


def parse_fuse_body(raw: bytes) -> FuseBody:
    """Decode (UTF-8), parse (JSON) and validate (strict) a fuse request body."""
    if not raw:
        raise InvalidRequest(
            "body", "empty: send a JSON object with 'text', 'texts' or 'token_ids'"
        )
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequest("body", f"not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    except RecursionError:
        raise InvalidRequest("body", "JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest("body", f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    try:
        return FuseBody.model_validate(document)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def fuse_body_openapi() -> dict[str, Any]:
    """``openapi_extra`` for ``POST /v1/fuse``: the body is read by hand, documented as
    ``FuseBody`` (its schema is added to the components by ``add_component_schemas``)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FuseBody"}}},
        }
    }


def add_component_schemas(spec: dict[str, Any], *models: type[BaseModel]) -> dict[str, Any]:
    """Put ``models`` (and the models they use) into ``spec``'s component schemas."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return spec
