"""Fused blocks out of a fused store, for a run whose blocks match it (the trainer, the collator).

Covers ``FusedStore``: opening a store (refusing an unfinished one), checking that a run matches it
(``check_run``: target tokenizer, fusion choices, block layout; the error names the field),
verifying each shard's checksum the first time it is read, and ``get(block)``: the block's
``FusedBlock`` [n rows], decoded from its own row group, after checking the stored target ids
against the block's. ``get`` / ``stats`` / ``close`` are what the recipe uses of the online
stream (``prefetch.FusedTargetStream``), so a run switches source in one place.

Leaves out: writing stores (``export``), the shard layout (``shards``), reading the store with
``datasets`` (``dataset``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fuseserve.store.manifest import StoreMismatch, check_matches, read_manifest, run_identity
from fuseserve.store.shards import ShardFile, file_sha256
from fuseserve.trainer.data import Block
from fuseserve.trainer.prefetch import PrefetchStats, TargetMismatch
from fuseserve.wire.messages import FusedBlock


def check_store_settings(cfg) -> None:
    """Before a run starts (``fuseserve train``'s driver): refuse a store that is unfinished or
    made for another target tokenizer, fusion choices, block size or chat mode (the blocks
    themselves are checked by each worker, which builds them)."""
    from fuseserve.loading import load_tokenizer
    from fuseserve.wire.tokenizer import TokenizerIdentity

    store = FusedStore(cfg.fused_from)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    check_matches(
        store.manifest, run_identity(cfg, TokenizerIdentity.from_hf(tokenizer).fingerprint)
    )


class StoreCorrupt(RuntimeError):
    """A shard whose bytes are not the ones the manifest recorded."""


class FusedStore:
    """Random access to the fused blocks of a finished store; see the module docstring."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        m = self.manifest
        if not m.complete or len(m.shards) != m.num_shards:
            raise StoreMismatch(
                f"fused_from: the store in {self.folder} is unfinished ({len(m.shards)} of "
                f"{m.num_shards} shards); run the same fuseserve export again to finish it"
            )
        self.teachers = m.teacher_names()
        self.stats = PrefetchStats()
        self._files: dict[int, ShardFile] = {}

    def check_run(self, cfg, target_fingerprint: str, blocks) -> None:
        """Refuse (``StoreMismatch`` naming the field) a run that would train on other blocks,
        another target tokenizer or other fusion choices than the store holds."""
        check_matches(self.manifest, run_identity(cfg, target_fingerprint, blocks))

    def _shard(self, index: int) -> ShardFile:
        if index not in self._files:
            entry = self.manifest.shards[index]
            path = self.folder / entry.file
            if not path.exists() or file_sha256(path) != entry.sha256:
                raise StoreCorrupt(
                    f"fused_from: {path} is missing or not the file the manifest recorded "
                    f"(sha256 {entry.sha256[:12]}...); export the store again"
                )
            self._files[index] = ShardFile(path, self.teachers)
        return self._files[index]

    def get(self, expected: Block) -> FusedBlock:
        """The fused block of ``expected`` (its n rows), checked against its target ids."""
        size = self.manifest.layout.shard_blocks
        shard, row = divmod(expected.index, size)
        ids, fused = self._shard(shard).block(row)
        if not np.array_equal(ids, expected.ids):
            raise TargetMismatch(
                f"block {expected.index}: the store's target ids differ from the run's"
            )
        self.stats.received += 1
        self.stats.consumed += 1
        return fused

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
