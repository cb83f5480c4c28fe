"""Teacher service settings: one pydantic-settings model, env prefix ``FUSESERVE_TEACHER_``.

Covers every knob of ``fuseserve teacher``; the CLI exposes the same fields as flags (flags win
over environment variables). Built in ``main()`` and passed down, never read at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fuseserve.wire.grpc_server import ServerSecurity


class TeacherSettings(BaseSettings, ServerSecurity):
    model_config = SettingsConfigDict(env_prefix="FUSESERVE_TEACHER_", extra="forbid")

    model: str = Field(
        "shipped:smollm2",
        description="model: a local directory, a .gguf file, a hub id, shipped:smollm2 or "
        "shipped:gemma3-270m (optional package; Gemma terms of use)",
    )
    tokenizer: str | None = Field(None, description="tokenizer spec when it differs from model")
    revision: str = Field("main", description="model revision (hub models)")
    backend: Literal["hf", "vllm", "tgi"] = "hf"
    remote_url: str | None = Field(None, description="vLLM/TGI base URL for remote backends")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any free port)")
    metrics_port: int = Field(9401, ge=0, le=65535, description="Prometheus port (0 = off)")
    max_k: int = Field(64, ge=1, le=1024, description="largest k a request may ask (tgi: 1)")
    max_sequence_length: int = Field(2048, ge=2)
    max_batch_texts: int = Field(64, ge=1, description="texts per Score request")
    max_request_tokens: int = Field(65536, ge=1, description="tokens per Score request")
    max_text_chars: int = Field(
        262144, ge=1, description="characters per text, checked before tokenising"
    )
    batch_token_budget: int = Field(8192, ge=1, description="padded tokens per forward pass")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for company")
    max_queue_sequences: int = Field(512, ge=1, description="queued sequences before 429")
    score_chunk_positions: int = Field(256, ge=1, description="positions per log-softmax chunk")
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    drain_seconds: float = Field(20.0, ge=0, description="SIGTERM grace for in-flight work")

    @model_validator(mode="after")
    def _remote_backends(self) -> TeacherSettings:
        if self.backend in ("vllm", "tgi") and not self.remote_url:
            raise ValueError(f"remote_url: the {self.backend} backend needs the server's base URL")
        if self.backend == "tgi":
            if "max_k" in self.model_fields_set and self.max_k > 1:
                from fuseserve.teacher.tgi_backend import TGI_K_MESSAGE

                raise ValueError(f"max_k={self.max_k}: {TGI_K_MESSAGE}")
            self.max_k = 1
        return self
