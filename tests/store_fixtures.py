"""A fused store of a small corpus (a pytest plugin loaded by tests/conftest.py).

``fused_store``: ``fuseserve export`` (in this process) of 32-token blocks of the shared prose, on
the session's aligner (tiny teachers spm + bpe, Redis) with the ``spans`` preset (tail mass kept),
8 blocks per shard. ``store_run`` gives the training settings that match it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class StoreCase:
    folder: Path
    corpus: str
    aligner: str
    export: dict  # the export's settings (ExportConfig fields)


def export_settings(tiny_dirs, corpus: str, aligner: str, out: Path, **overrides) -> dict:
    values = dict(
        tokenizer=str(tiny_dirs["spm"]),
        data=[corpus],
        block_size=32,
        aligner=aligner,
        preset="spans",
        out=str(out),
        shard_blocks=8,
    )
    return {**values, **overrides}


@pytest.fixture(scope="session")
def fused_store(tmp_path_factory, aligner, tiny_dirs, prose) -> StoreCase:
    from fuseserve.store.config import ExportConfig
    from fuseserve.store.export import run_export

    root = tmp_path_factory.mktemp("fused-store")
    corpus = root / "prose.txt"
    corpus.write_text(prose[:12000])
    settings = export_settings(tiny_dirs, str(corpus), aligner.grpc_address, root / "store")
    run_export(ExportConfig(**settings), progress=False)
    return StoreCase(root / "store", str(corpus), aligner.grpc_address, settings)


def store_run(tiny_dirs, case: StoreCase, tmp_path: Path, **overrides) -> dict:
    """TrainConfig settings of a 20-step fused run on the store's blocks (no aligner)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    values = dict(
        model=str(tiny_dirs["spm"]),
        data=[case.corpus],
        block_size=32,
        preset="spans",
        batch_size=2,
        max_steps=20,
        lr=1e-3,
        torch_threads=1,
        fused_from=str(case.folder),
        checkpoint_every=1000,
        storage_path=str(tmp_path / "runs"),
        metrics_file=str(tmp_path / "metrics.jsonl"),
    )
    return {**values, **overrides}
