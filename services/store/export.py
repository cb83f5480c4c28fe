"""``fuseserve export``: the fused targets of every block of a corpus, written as a fused store.

Covers building the blocks exactly as a training run does (``build_blocks`` on the
``TrainConfig`` of the export's settings), reading the aligner's Info (target tokenizer,
teachers, defaults) and each teacher's own Info where it can be reached (revision, dtype,
backend), asking for the fused blocks through the trainer's own prefetch stream (the same
requests, float16 width and checks as an online run), and writing them shard by shard: each shard
goes to a temporary file that is renamed into place, then the manifest records it with its
checksum. Started again on the same folder, an export keeps every recorded shard whose checksum
still matches and redoes the rest; a folder holding another export is refused, naming the field.

Leaves out: the shard layout (``shards``), the manifest's fields and matching (``manifest``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fuseserve.store.config import ExportConfig
from fuseserve.store.manifest import (
    Fusion,
    Layout,
    Manifest,
    ShardEntry,
    StoreMismatch,
    TeacherEntry,
    check_matches,
    read_manifest,
    run_identity,
    write_manifest,
)
from fuseserve.store.shards import file_sha256, write_shard

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """What one ``run_export`` call did; ``store_bytes`` / ``store_tokens``: the whole store."""

    blocks_written: int
    blocks_kept: int
    seconds: float
    cache_hits: int
    store_bytes: int
    store_tokens: int
    folder: Path

    @property
    def blocks_per_s(self) -> float:
        return self.blocks_written / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        per_token = self.store_bytes / max(self.store_tokens, 1)
        hits = self.cache_hits / max(self.blocks_written, 1)
        return (
            f"exported {self.blocks_written} blocks in {self.seconds:.1f} s "
            f"({self.blocks_per_s:.2f} blocks/s, aligner cache hits {hits:.0%}), kept "
            f"{self.blocks_kept} already stored; store {self.folder}: {self.store_tokens} tokens, "
            f"{self.store_bytes / 2**20:.2f} MiB, {per_token:.1f} B per token"
        )


def aligner_manifest(cfg: ExportConfig, target_fingerprint: str, identity: dict) -> Manifest:
    """A new manifest (no shards yet) from the aligner's Info and its teachers' own Info."""
    from fuseserve import __version__
    from fuseserve.client import GrpcClient

    with GrpcClient(cfg.aligner or "", timeout_s=60) as client:
        info = client.info()
    if info.target_fingerprint != target_fingerprint:
        raise StoreMismatch(
            f"tokenizer: the aligner's target tokenizer ({info.target_tokenizer}, "
            f"{info.target_fingerprint}) is not {cfg.tokenizer_spec!r} ({target_fingerprint})"
        )
    wanted = set(cfg.teachers) or {t.name for t in info.teachers}
    teachers = [teacher_entry(t) for t in info.teachers if t.name in wanted]
    fusion = Fusion(
        preset=cfg.preset,
        options=dict(cfg.fusion_options),
        k=cfg.k,
        teachers=list(cfg.teachers),
        aligner_default_k=info.default_k,
        aligner_default_options=json.loads(info.default_options_json or "{}"),
    )
    layout = Layout(
        block_size=cfg.block_size,
        chat=cfg.chat,
        data_fingerprint=identity["layout.data_fingerprint"],
        num_blocks=identity["layout.num_blocks"],
        num_tokens=0,
        shard_blocks=cfg.shard_blocks,
    )
    return Manifest(
        fuseserve_version=__version__,
        target_tokenizer=cfg.tokenizer_spec,
        target_fingerprint=target_fingerprint,
        teachers=teachers,
        fusion=fusion,
        layout=layout,
    )


def teacher_entry(info) -> TeacherEntry:
    """A teacher as the aligner lists it, plus its revision, dtype and backend from its own
    Info when one of its addresses answers within 10 s (else those stay None)."""
    entry = TeacherEntry(
        name=info.name,
        model_id=info.model_id,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        vocab_size=info.vocab_size,
    )
    if not info.addresses:
        return entry
    from fuseserve.teacher.client import TeacherClient

    async def ask():
        client = TeacherClient(info.addresses[0], timeout_s=10)
        try:
            return await client.info()
        finally:
            await client.close()

    try:
        own = asyncio.run(ask())
    except Exception as exc:  # unreachable from here: the aligner's view is still recorded
        log.warning("teacher %s: no Info from %s (%s)", info.name, info.addresses[0], exc)
        return entry
    return entry.model_copy(
        update={
            "revision": own.revision,
            "dtype": own.dtype,
            "backend": own.backend,
            "cache_fingerprint": own.cache_fingerprint(),
        }
    )


def resumed_manifest(out: Path, fresh: Manifest, identity: dict) -> Manifest:
    """The manifest to continue from: ``fresh`` when ``out`` holds none, else the stored one
    (refused when it was made from other blocks, fusion choices or teachers), keeping only the
    shards whose file still has the recorded checksum."""
    try:
        stored = read_manifest(out)
    except FileNotFoundError:
        return fresh
    check_matches(stored, identity, what="out")
    for field in ("shard_blocks",):
        if getattr(stored.layout, field) != getattr(fresh.layout, field):
            raise StoreMismatch(
                f"out: the store's layout.{field} is {getattr(stored.layout, field)}, this "
                f"export's is {getattr(fresh.layout, field)}; use another --out"
            )
    if [t.model_dump() for t in stored.teachers] != [t.model_dump() for t in fresh.teachers]:
        raise StoreMismatch(
            f"out: the store's teachers ({[t.name for t in stored.teachers]}) are not the "
            "aligner's now (names, models, revisions or tokenizers differ); use another --out"
        )
    kept = [s for s in stored.shards if verified(out, s)]
    return stored.model_copy(update={"shards": kept, "complete": False})


def verified(out: Path, shard: ShardEntry) -> bool:
    path = out / shard.file
    ok = path.exists() and path.stat().st_size == shard.bytes and file_sha256(path) == shard.sha256
    if not ok:
        log.warning("shard %s is missing or changed; it is exported again", shard.file)
    return ok


def run_export(cfg: ExportConfig, progress: bool = True, on_block=None) -> ExportReport:
    """Export (or finish exporting) the store in ``cfg.out``; ``on_block(i)`` is called after
    each block arrives (for progress displays)."""
    from fuseserve.loading import load_tokenizer
    from fuseserve.trainer.data import build_blocks
    from fuseserve.wire.tokenizer import TokenizerIdentity

    tokenizer = load_tokenizer(cfg.tokenizer_spec)
    blocks = build_blocks(cfg.train_config(), tokenizer)
    if not blocks:
        raise ValueError(f"data: no block of {cfg.block_size} tokens in {cfg.data}")
    fingerprint = TokenizerIdentity.from_hf(tokenizer).fingerprint
    identity = run_identity(cfg, fingerprint, blocks)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = resumed_manifest(out, aligner_manifest(cfg, fingerprint, identity), identity)
    manifest.layout.num_tokens = sum(len(b.ids) for b in blocks)
    write_manifest(out, manifest)
    return ShardWriter(cfg, out, manifest, blocks, fingerprint).run(progress, on_block)


class ShardWriter:
    """Fetches the blocks of the shards not yet in ``manifest`` and writes them in order."""

    def __init__(self, cfg: ExportConfig, out: Path, manifest: Manifest, blocks, fingerprint):
        self.cfg, self.out, self.manifest, self.blocks = cfg, out, manifest, blocks
        self.fingerprint = fingerprint
        done = {s.index for s in manifest.shards}
        self.todo = [s for s in range(manifest.num_shards) if s not in done]

    def open_stream(self):
        from fuseserve.trainer.prefetch import FusedTargetStream

        order = (i for s in self.todo for i in self.manifest.shard_range(s))
        cfg = self.cfg
        return FusedTargetStream(
            cfg.aligner or "",
            self.blocks,
            order,
            depth=cfg.prefetch_depth,
            target_fingerprint=self.fingerprint,
            k=cfg.k,
            teachers=cfg.teachers,
            preset=cfg.preset,
            options_json=json.dumps(cfg.fusion_options) if cfg.fusion_options else "",
            float_dtype=self.manifest.fusion.float_dtype,
            timeout_s=cfg.aligner_timeout_s,
            outage_window_s=cfg.aligner_outage_s,
        ).start()

    def run(self, progress: bool, on_block) -> ExportReport:
        from tqdm import tqdm

        kept = sum(s.num_blocks for s in self.manifest.shards)
        bar = tqdm(total=len(self.blocks), initial=kept, unit="block", disable=not progress,
                   desc="export", dynamic_ncols=True)  # fmt: skip
        stream = self.open_stream() if self.todo else None
        start, written = time.perf_counter(), 0
        try:
            for shard in self.todo:
                written += self.write(shard, stream, bar, on_block)
        finally:
            bar.close()
            if stream is not None:
                stream.close()
        seconds = time.perf_counter() - start
        self.manifest.complete = True
        write_manifest(self.out, self.manifest)
        hits = stream.stats.cache_hits if stream is not None else 0
        total = sum(s.bytes for s in self.manifest.shards)
        tokens = self.manifest.layout.num_tokens
        return ExportReport(written, kept, seconds, hits, total, tokens, self.out)

    def write(self, shard: int, stream, bar, on_block) -> int:
        """Fetch, write and record one shard; the number of blocks it holds."""
        blocks = [self.blocks[i] for i in self.manifest.shard_range(shard)]
        fused = []
        for block in blocks:
            fused.append(stream.get(block))
            bar.update(1)
            if on_block is not None:
                on_block(block.index)
        name = f"shards/shard-{shard:05d}.parquet"
        path = self.out / name
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        write_shard(tmp, blocks, fused)
        tmp.replace(path)
        entry = ShardEntry(
            index=shard,
            file=name,
            first_block=blocks[0].index,
            num_blocks=len(blocks),
            num_tokens=sum(len(b.ids) for b in blocks),
            bytes=path.stat().st_size,
            sha256=file_sha256(path),
        )
        self.manifest.shards = sorted([*self.manifest.shards, entry], key=lambda s: s.index)
        write_manifest(self.out, self.manifest)
        return len(blocks)
