"""Persisted vocabulary maps: one file per (teacher fingerprint, target fingerprint, mode).

Covers: building a map once per tokenizer pair and reusing it across runs (atomic writes, a
progress bar while MinED runs, a corrupt or foreign file is rebuilt, never trusted).

Leaves out: the mapping itself (``vocabmap``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fuseserve.aligner.continuation import ContinuationTable, FirstTokens, build_continuation_table
from fuseserve.aligner.tokenview import TokenizerView
from fuseserve.aligner.vocabmap import StringMode, VocabMap, build_vocab_map
from fuseserve.wire.codec import CodecError

log = logging.getLogger(__name__)


class VocabMapStore:
    """A directory of ``vocabmap-<teacher>-<target>-<mode>.fsw`` files, and of the
    ``continuations-<teacher>-<target>.fsw`` tables that the ``spans`` method uses."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path_for(
        self, teacher_fp: str, target_fp: str, mode: StringMode, cooc: bool = False
    ) -> Path:
        suffix = "-cooc" if cooc else ""
        return self.directory / f"vocabmap-{teacher_fp}-{target_fp}-{StringMode(mode)}{suffix}.fsw"

    def load(
        self, teacher: TokenizerView, target: TokenizerView, mode: StringMode, cooc: bool = False
    ):
        """The stored map (the co-occurrence refined one with ``cooc``), or None."""
        path = self.path_for(teacher.fingerprint, target.fingerprint, mode, cooc)
        if not path.exists():
            return None
        try:
            vmap = VocabMap.from_bytes(path.read_bytes())
        except (CodecError, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable vocabulary map %s: %s", path, exc)
            return None
        if (
            vmap.teacher_fingerprint != teacher.fingerprint
            or vmap.target_fingerprint != target.fingerprint
            or vmap.teacher_vocab_size != teacher.vocab_size
        ):
            log.warning("ignoring vocabulary map %s built for other tokenizers", path)
            return None
        return vmap

    def save(self, vmap: VocabMap) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(
            vmap.teacher_fingerprint, vmap.target_fingerprint, vmap.mode, bool(vmap.corpus)
        )
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(vmap.to_bytes())
        os.replace(tmp, path)
        return path

    def get_or_build(
        self,
        teacher: TokenizerView,
        target: TokenizerView,
        mode: StringMode = StringMode.SURFACE,
        show_progress: bool = True,
    ) -> VocabMap:
        """The stored map for this pair, or a freshly built (and stored) one."""
        vmap = self.load(teacher, target, mode)
        if vmap is not None:
            return vmap
        from tqdm.auto import tqdm

        bar = tqdm(
            total=teacher.vocab_size,
            desc=f"MinED {teacher.name} -> {target.name}",
            unit="tok",
            disable=not show_progress,
        )

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            vmap = build_vocab_map(teacher, target, mode, progress=progress)
        finally:
            bar.close()
        self.save(vmap)
        return vmap

    # ------------------------------------------------------------------ continuation tables
    def continuations_path(self, teacher_fp: str, target_fp: str) -> Path:
        return self.directory / f"continuations-{teacher_fp}-{target_fp}.fsw"

    def get_or_build_continuations(
        self,
        teacher: TokenizerView,
        target: TokenizerView,
        first_tokens: FirstTokens | None,
        show_progress: bool = True,
    ) -> ContinuationTable:
        """The stored continuation table for this pair, or a freshly built (and stored) one."""
        path = self.continuations_path(teacher.fingerprint, target.fingerprint)
        if path.exists():
            try:
                table = ContinuationTable.from_bytes(path.read_bytes())
                if (
                    table.teacher_fingerprint == teacher.fingerprint
                    and table.target_fingerprint == target.fingerprint
                    and table.teacher_vocab_size == teacher.vocab_size
                ):
                    return table
                log.warning("ignoring continuation table %s built for other tokenizers", path)
            except (CodecError, KeyError, ValueError) as exc:
                log.warning("ignoring unreadable continuation table %s: %s", path, exc)
        vmap = self.get_or_build(teacher, target, StringMode.SURFACE, show_progress)
        log.info("building the continuation table %s -> %s", teacher.name, target.name)
        table = build_continuation_table(teacher, target, vmap, first_tokens)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(table.to_bytes())
        os.replace(tmp, path)
        return table

    def refine(
        self, vmap: VocabMap, texts: list[str], teacher_tok, target_tok, teacher, target
    ) -> tuple[VocabMap, int, Path]:
        """The co-occurrence refinement of a surface map over ``texts``, stored: (the refined
        map, how many entries it re-ranked, where it is stored)."""
        from fuseserve.aligner.cooccurrence import build_refined_map

        if vmap.mode is not StringMode.SURFACE:
            raise ValueError("--cooc-corpus refines the surface map (--mode surface)")
        refined = build_refined_map(vmap, texts, teacher_tok, target_tok, teacher, target)
        self.save(refined)
        changed = int((refined.target_ids != vmap.target_ids).sum())
        where = self.path_for(teacher.fingerprint, target.fingerprint, vmap.mode, True)
        return refined, changed, where
