"""Settings of ``fuseserve export``: env prefix ``FUSESERVE_EXPORT_``, an optional YAML file, flags.

The fields that decide which blocks a corpus gives and which fused targets they get (data,
tokenizer, block size, chat, aligner, teachers, preset, options, k) are ``TrainConfig``'s own
field definitions, copied from it when this module is imported, and ``train_config`` turns the
settings back into a ``TrainConfig`` for ``build_blocks``: an export and a training run with the
same flags build the same blocks and ask for the same targets, so they cannot drift apart.

Leaves out: the export itself (``export``) and the store's format (``shards``, ``manifest``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic import Field, create_model, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from fuseserve.config_file import load_settings_file
from fuseserve.trainer.config import TrainConfig

SHARED = (
    "tokenizer",
    "data",
    "data_field",
    "block_size",
    "chat",
    "aligner",
    "teachers",
    "preset",
    "fusion_options",
    "k",
    "aligner_timeout_s",
    "aligner_outage_s",
)

# what these two mean for an export (their types and defaults stay TrainConfig's)
DESCRIPTIONS = {
    "aligner": "aligner gRPC host:port (required: every block is asked of it)",
    "tokenizer": "target tokenizer spec (default: --model's)",
}


def _shared_field(name: str) -> tuple[Any, FieldInfo]:
    field = copy.copy(TrainConfig.model_fields[name])
    field.description = DESCRIPTIONS.get(name, field.description)
    return field.annotation, field


_FIELDS: dict[str, Any] = {name: _shared_field(name) for name in SHARED}
_Shared: Any = create_model("_Shared", __base__=BaseSettings, **_FIELDS)  # TrainConfig's fields


class ExportConfig(_Shared):
    model_config = SettingsConfigDict(env_prefix="FUSESERVE_EXPORT_", extra="forbid")

    if TYPE_CHECKING:  # the SHARED fields as the type checker sees them (defined by TrainConfig)
        tokenizer: str | None
        data: list[str]
        data_field: str
        block_size: int
        chat: bool
        aligner: str | None
        teachers: list[str]
        preset: str
        fusion_options: dict[str, Any]
        k: int
        aligner_timeout_s: float
        aligner_outage_s: float

    model: str | None = Field(
        None, description="target model whose tokenizer cuts the blocks (when no --tokenizer)"
    )
    out: str = Field(description="store folder (created; an unfinished export there resumes)")
    shard_blocks: int = Field(256, ge=1, description="blocks per shard file")
    prefetch_depth: int = Field(
        8,
        ge=1,
        description="blocks asked of the aligner ahead (more keeps several teacher replicas "
        "busy; the aligner sheds requests it cannot answer within its request deadline)",
    )

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if not self.aligner:
            raise ValueError("aligner: needed (the export asks the aligner for every block)")
        if not (self.tokenizer or self.model):
            raise ValueError("tokenizer: give the target's --tokenizer (or --model)")
        return self

    @property
    def tokenizer_spec(self) -> str:
        return self.tokenizer or self.model or ""

    def train_config(self) -> TrainConfig:
        """The ``TrainConfig`` whose blocks and fused targets this export writes."""
        shared = {name: getattr(self, name) for name in SHARED}
        return TrainConfig(model=self.model or self.tokenizer_spec, **shared)


def load_export_config(config: str | None = None, **overrides: Any) -> ExportConfig:
    """Settings from an optional YAML file, the environment and explicit overrides."""
    return load_settings_file(ExportConfig, config, **overrides)
