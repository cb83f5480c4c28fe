"""The manifest of a fused store (``manifest.json``): what the fused targets were made from.

Covers the manifest's fields (schema version, the target tokenizer's fingerprint, every teacher
with its model, revision and fingerprints, the fusion choices and k, the block layout, and one
entry per finished shard with its checksum), reading and writing it atomically, and the check
that a run (or a resumed export) matches a store: ``run_identity`` lists the fields that decide
what the fused targets are, ``check_matches`` names the first one that differs.

Leaves out: the shards' contents (``shards``) and gathering the values (``export``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

STORE_SCHEMA = 1
MANIFEST = "manifest.json"
FLOAT_DTYPE = "f16"  # the width the trainer's online stream asks for


class StoreMismatch(ValueError):
    """A store made from other blocks, another tokenizer or other fusion choices."""


class TeacherEntry(BaseModel):
    """One teacher behind the aligner at export time. ``revision`` / ``cache_fingerprint``
    (model, revision, tokenizer, dtype, backend) are None when the exporter could not reach the
    teacher itself (the aligner's Info still gives its model and tokenizer)."""

    name: str
    model_id: str
    tokenizer_fingerprint: str
    vocab_size: int
    revision: str | None = None
    dtype: str | None = None
    backend: str | None = None
    cache_fingerprint: str | None = None


class Fusion(BaseModel):
    """The run's fusion choices as sent to the aligner ("" / {} / 0 / []: its defaults), and the
    defaults the aligner had (what "" and 0 meant)."""

    preset: str
    options: dict[str, Any]
    k: int
    teachers: list[str]
    aligner_default_k: int
    aligner_default_options: dict[str, Any]
    float_dtype: str = FLOAT_DTYPE


class Layout(BaseModel):
    """The blocks: how they were cut and a fingerprint of their texts in order."""

    block_size: int
    chat: bool
    data_fingerprint: str
    num_blocks: int
    num_tokens: int
    shard_blocks: int


class ShardEntry(BaseModel):
    """A finished shard: blocks [first_block, first_block + num_blocks) in ``file``."""

    index: int
    file: str
    first_block: int
    num_blocks: int
    num_tokens: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    schema_version: int = STORE_SCHEMA
    format: str = "parquet"
    fuseserve_version: str
    target_tokenizer: str
    target_fingerprint: str
    teachers: list[TeacherEntry]
    fusion: Fusion
    layout: Layout
    shards: list[ShardEntry] = Field(default_factory=list)
    complete: bool = False

    @property
    def num_shards(self) -> int:
        size = self.layout.shard_blocks
        return (self.layout.num_blocks + size - 1) // size

    def shard_range(self, index: int) -> range:
        """Block indices of shard ``index``."""
        size = self.layout.shard_blocks
        return range(index * size, min((index + 1) * size, self.layout.num_blocks))

    def teacher_names(self) -> list[str]:
        """The teachers in the order of each block's ``ce`` / ``coverage``."""
        return [t.name for t in self.teachers]


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"fused_from: {folder} has no {MANIFEST} (not a fused store)")
    manifest = Manifest.model_validate_json(path.read_text())
    if manifest.schema_version != STORE_SCHEMA:
        raise StoreMismatch(
            f"schema_version: the store has {manifest.schema_version}, this fuseserve reads "
            f"{STORE_SCHEMA}; export it again"
        )
    return manifest


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (a temporary file renamed over it)."""
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def run_identity(cfg, target_fingerprint: str, blocks=None) -> dict[str, Any]:
    """The fields a store must share with a run (a ``TrainConfig`` or export settings): target
    tokenizer, fusion choices as requested, block layout; keys as they read in the manifest.
    Without ``blocks``, only what the settings and tokenizer decide (no block count or texts)."""
    from fuseserve.trainer.data import data_fingerprint

    settled = {
        "target_fingerprint": target_fingerprint,
        "fusion.preset": cfg.preset,
        "fusion.options": dict(cfg.fusion_options),
        "fusion.k": cfg.k,
        "fusion.teachers": list(cfg.teachers),
        "layout.block_size": cfg.block_size,
        "layout.chat": cfg.chat,
    }
    if blocks is None:
        return settled
    blocks_part = {
        "layout.num_blocks": len(blocks),
        "layout.data_fingerprint": data_fingerprint(blocks),
    }
    return {**settled, **blocks_part}


def manifest_identity(manifest: Manifest) -> dict[str, Any]:
    """``run_identity``'s fields as the manifest has them."""
    m = manifest
    return {
        "target_fingerprint": m.target_fingerprint,
        "fusion.preset": m.fusion.preset,
        "fusion.options": m.fusion.options,
        "fusion.k": m.fusion.k,
        "fusion.teachers": m.fusion.teachers,
        "layout.block_size": m.layout.block_size,
        "layout.chat": m.layout.chat,
        "layout.num_blocks": m.layout.num_blocks,
        "layout.data_fingerprint": m.layout.data_fingerprint,
    }


HINTS = {
    "target_fingerprint": "the store was made for another target tokenizer (--tokenizer/--model)",
    "fusion.preset": "set --preset as the export did",
    "fusion.options": "set --fusion-options as the export did",
    "fusion.k": "set --k as the export did",
    "fusion.teachers": "set --teachers as the export did",
    "layout.block_size": "set --block-size as the export did",
    "layout.chat": "set --chat as the export did",
    "layout.num_blocks": "the run's --data gives other blocks than the export's",
    "layout.data_fingerprint": "the run's --data gives other block texts than the export's",
}


def check_matches(manifest: Manifest, identity: dict[str, Any], what: str = "fused_from") -> None:
    """Raise ``StoreMismatch`` naming the first field where ``identity`` differs from the store."""
    stored = manifest_identity(manifest)
    for key, value in identity.items():
        if stored[key] != value:
            raise StoreMismatch(
                f"{what}: the store's {key} is {stored[key]!r}, this run's is {value!r} "
                f"({HINTS[key]})"
            )
