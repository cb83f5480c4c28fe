"""Aligner service settings: env prefix ``FUSESERVE_ALIGNER_``, an optional YAML file, CLI flags.

Precedence: flags > environment variables > the YAML file (``--config``) > defaults. ``REDIS_URL``
is honoured as well as ``FUSESERVE_ALIGNER_REDIS_URL``. Teachers in env vars are JSON, e.g.
``FUSESERVE_ALIGNER_TEACHERS='[{"name": "smollm2", "addresses": ["127.0.0.1:50051"]}]'``.

Leaves out: the alignment/fusion options themselves (``fuseserve.aligner.options``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fuseserve.aligner.options import FusionOptions
from fuseserve.config_file import load_settings_file
from fuseserve.wire.grpc_server import ServerSecurity


def default_vocab_map_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "fuseserve" / "vocab-maps")


class TeacherEndpoint(BaseModel):
    """One source model: a name and the addresses (host:port) of its replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    addresses: tuple[str, ...] = Field(min_length=1)


class AlignerSettings(BaseSettings, ServerSecurity):
    model_config = SettingsConfigDict(
        env_prefix="FUSESERVE_ALIGNER_", extra="forbid", populate_by_name=True
    )

    target_tokenizer: str = Field(
        "shipped:mistral-v1", description="target tokenizer spec (as `fuseserve vocab-map`)"
    )
    teachers: tuple[TeacherEndpoint, ...] = Field(
        (), description="teachers: name=host:port[,host:port...] (repeatable)"
    )
    preset: Literal["default", "spans", "fusellm"] = Field(
        "spans",
        description="options preset: spans (a teacher distribution at every position, tail "
        "mass kept), default (byte-offset pairs, renormalised top-k) or fusellm (the original)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="FusionOptions overrides (JSON object)"
    )
    k: int = Field(10, ge=1, le=1024, description="top-k asked of every teacher by default")
    host: str = Field("127.0.0.1", description="bind address of both ports")
    rest_port: int = Field(8080, ge=0, le=65535, description="REST port (FastAPI, /metrics)")
    grpc_port: int = Field(50061, ge=0, le=65535, description="gRPC port (aligner.v1)")
    max_block_tokens: int = Field(4096, ge=2, description="target tokens per text block")
    max_texts: int = Field(32, ge=1, description="texts per request")
    max_text_chars: int = Field(
        262144, ge=2, description="characters per text, checked before tokenising (422)"
    )
    max_text_bytes: int = Field(
        512 * 1024, ge=2, description="UTF-8 bytes per text, checked before tokenising (422)"
    )
    max_inflight_blocks: int = Field(256, ge=1, description="blocks in flight before 429")
    request_deadline_s: float = Field(
        30.0,
        gt=0,
        description="admit a FuseStream request (a trainer's) only if its teachers and the "
        "aligner can answer it within this, at their measured rates (else RESOURCE_EXHAUSTED)",
    )
    interactive_deadline_s: float = Field(
        5.0,
        gt=0,
        description="the same for REST and unary gRPC requests (else 429 with Retry-After): the "
        "most work an overload leaves behind, so normal latency returns within about this long",
    )
    max_stream_inflight: int = Field(8, ge=1, description="blocks in flight per FuseStream")
    max_prompts: int = Field(
        4096,
        ge=1,
        description="prompts per /v1/completions request (fused in requests of max_texts)",
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="REST body limit (413)")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a REST body must arrive within this many seconds (408)"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a REST request's headers must arrive within this many seconds of the "
        "connection opening or the request's first byte (408, connection closed)",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="REST connections open at once; one more is answered 503 and closed",
    )
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    teacher_timeout_s: float = Field(120.0, gt=0, description="deadline per teacher call")
    teacher_retries: int = Field(2, ge=0, description="retries on UNAVAILABLE (with backoff)")
    teacher_backoff_s: float = Field(0.2, ge=0, description="first retry backoff (doubles)")
    startup_timeout_s: float = Field(600.0, gt=0, description="wait this long for teachers")
    info_refresh_s: float = Field(30.0, ge=0, description="re-read teacher Info (0 = never)")
    health_interval_s: float = Field(
        0.5, ge=0, description="check every teacher's gRPC health this often (0 = never)"
    )
    ready_min_teachers: int = Field(
        0, ge=0, description="/readyz and gRPC health: ready while this many teachers are (0 = all)"
    )
    teacher_float_dtype: Literal["f16", "f32"] = Field("f32", description="teacher payload")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "FUSESERVE_ALIGNER_REDIS_URL", "REDIS_URL"),
        description="redis://[:password@]host:port/db or rediss:// (unset = in-process LRU)",
    )
    redis_prefix: str = Field("fuseserve:", description="key prefix in Redis")
    redis_timeout_s: float = Field(0.25, gt=0, description="per Redis command")
    redis_retry_s: float = Field(5.0, ge=0, description="skip Redis this long after a failure")
    redis_max_connections: int = Field(
        512,
        ge=1,
        description="Redis commands at once (a request uses up to 1 + teachers per block; size it "
        "to max_inflight_blocks x (1 + teachers))",
    )
    redis_pool_timeout_s: float = Field(
        0.25, gt=0, description="wait this long for a free Redis connection, then miss"
    )
    cache_ttl_s: int = Field(0, ge=0, description="Redis key TTL (0 = none; rely on LRU)")
    lru_max_bytes: int = Field(512 * 1024 * 1024, ge=0, description="in-process cache size")
    vocab_map_dir: str = Field(
        default_factory=default_vocab_map_dir, description="persisted vocabulary maps"
    )
    teacher_tls_ca: str | None = Field(
        None, description="PEM CA to trust when calling teachers over TLS (unset = plaintext)"
    )
    teacher_tls_cert: str | None = Field(None, description="client certificate for teacher mTLS")
    teacher_tls_key: str | None = Field(None, description="key of teacher_tls_cert")
    teacher_api_key: SecretStr | None = Field(None, description="bearer token sent to teachers")
    log_level: str = Field("info", description="logging level")

    @model_validator(mode="after")
    def _check(self) -> AlignerSettings:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: duplicate names in {names}")
        self.fusion_options()  # invalid presets/overrides fail at start-up, naming the field
        return self

    def fusion_options(self) -> FusionOptions:
        return FusionOptions.preset(self.preset, **self.options)


def parse_teacher_flag(value: str) -> TeacherEndpoint:
    """``name=host:port[,host:port...]`` -> TeacherEndpoint."""
    name, sep, addresses = value.partition("=")
    if not sep or not addresses:
        raise ValueError(f"teachers: expected name=host:port[,host:port], got {value!r}")
    return TeacherEndpoint(name=name, addresses=tuple(a for a in addresses.split(",") if a))


def load_settings(config: str | None = None, **overrides: Any) -> AlignerSettings:
    """Settings from an optional YAML file, the environment and explicit overrides."""
    return load_settings_file(AlignerSettings, config, **overrides)
