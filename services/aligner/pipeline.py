"""From one block's target tokens and K teachers' scores to a fused block.

Covers: byte-precise context ends, alignment by the chosen method, projection through each
teacher's vocabulary map, cross-entropies and fusion, with the consistency checks between them
(vocabulary maps built for these tokenizers and this string mode).

Leaves out: tokenising the text, calling teachers, caching (the service adapters do that).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from fuseserve.aligner.alignment import Alignment, AlignMethod, align_dtw, align_offsets
from fuseserve.aligner.continuation import ContinuationTable
from fuseserve.aligner.fusion import (
    Fused,
    FusionLevel,
    FusionMethod,
    fuse,
    sequence_ce,
    token_costs,
)
from fuseserve.aligner.options import FusionOptions, VocabAlign
from fuseserve.aligner.projection import Fallback, SparseDist, project
from fuseserve.aligner.spans import project_spans
from fuseserve.aligner.tokenview import TokenizerView, context_ends
from fuseserve.aligner.vocabmap import VocabMap
from fuseserve.wire.messages import FusedBlock, TeacherScores


@dataclass(frozen=True)
class TeacherInput:
    """One teacher's part in a block: its name, vocabulary view, map onto the target, scores,
    and (for ``alignment='spans'``) its continuation table onto the target."""

    name: str
    view: TokenizerView
    vocab_map: VocabMap
    scores: TeacherScores
    continuations: ContinuationTable | None = None


@dataclass(frozen=True)
class TeacherResult:
    """Per-teacher intermediate results, for inspection and tests (``dist`` is None for a
    teacher whose rows fusion does not use)."""

    alignment: Alignment
    dist: SparseDist | None
    ce: float


def align_teacher(
    text: str,
    target: TokenizerView,
    target_ids: np.ndarray,
    target_ends: np.ndarray,
    teacher: TeacherInput,
    options: FusionOptions,
) -> Alignment:
    scores = teacher.scores
    teacher_ends = context_ends(scores.token_ids, scores.offsets, text, teacher.view)
    if options.alignment is AlignMethod.OFFSETS:
        return align_offsets(target_ids, target_ends, teacher_ends)
    soft = teacher.vocab_map.table(soft=True) if options.vocab is not VocabAlign.HARD else None
    return align_dtw(
        target_ids,
        scores.token_ids,
        target,
        teacher.view,
        anchor=options.anchor,
        soft_table=soft,
        compat=options.dtw_compat,
        target_ends=target_ends,
        teacher_ends=teacher_ends,
    )


def _check_map(target: TokenizerView, teacher: TeacherInput, options: FusionOptions) -> None:
    vmap = teacher.vocab_map
    if vmap.target_fingerprint != target.fingerprint:
        raise ValueError(f"teacher {teacher.name!r}: vocabulary map built for another target")
    if vmap.teacher_fingerprint != teacher.view.fingerprint:
        raise ValueError(f"teacher {teacher.name!r}: vocabulary map built for another tokenizer")
    if vmap.mode != options.strings:
        raise ValueError(
            f"teacher {teacher.name!r}: vocabulary map mode {vmap.mode} "
            f"!= strings={options.strings}"
        )
    if options.vocab is VocabAlign.COOC and not vmap.corpus:
        raise ValueError(f"teacher {teacher.name!r}: vocab='cooc' needs a co-occurrence map")


def run_teachers(
    text: str,
    target: TokenizerView,
    target_ids: np.ndarray,
    target_offsets: np.ndarray,
    teachers: Sequence[TeacherInput],
    options: FusionOptions,
    rows_for: Collection[int] | None = None,
) -> list[TeacherResult]:
    """Align every teacher to the target positions of this block, and project the teachers in
    ``rows_for`` (all when None) onto the target vocabulary."""
    target_ids = np.asarray(target_ids, dtype=np.int64)
    target_ends = context_ends(target_ids, target_offsets, text, target)
    results = []
    for index, teacher in enumerate(teachers):
        wanted = rows_for is None or index in rows_for
        _check_map(target, teacher, options)
        if options.alignment is AlignMethod.SPANS:
            table = teacher.continuations
            if table is None or table.target_fingerprint != target.fingerprint:
                raise ValueError(
                    f"teacher {teacher.name!r}: alignment='spans' needs its continuation table "
                    "onto this target"
                )
            scores = teacher.scores
            teacher_ends = context_ends(scores.token_ids, scores.offsets, text, teacher.view)
            alignment, dist = project_spans(
                text, target_ids, target_ends, teacher.view, scores, teacher_ends, table,
                keep_tail=options.tail, fallback=options.fallback, rows_wanted=wanted,
            )  # fmt: skip
            results.append(TeacherResult(alignment, dist, sequence_ce(scores.gold_logprobs)))
            continue
        alignment = align_teacher(text, target, target_ids, target_ends, teacher, options)
        if not wanted:
            results.append(
                TeacherResult(alignment, None, sequence_ce(teacher.scores.gold_logprobs))
            )
            continue
        dist = project(
            alignment,
            teacher.scores.topk_ids,
            teacher.scores.topk_logprobs,
            teacher.vocab_map.table(soft=options.vocab is not VocabAlign.HARD),
            temperature=options.temperature,
            duplicates=options.duplicates,
            fallback=options.fallback,
        )
        results.append(TeacherResult(alignment, dist, sequence_ce(teacher.scores.gold_logprobs)))
    return results


def fuse_block(
    text: str,
    target: TokenizerView,
    target_ids: np.ndarray,
    target_offsets: np.ndarray,
    teachers: Sequence[TeacherInput],
    options: FusionOptions | None = None,
) -> FusedBlock:
    """Fuse K teachers' scores for one block of text.

    target_ids: [n]; target_offsets: [n, 2] character offsets of the target tokens in ``text``.
    """
    options = options or FusionOptions()
    if not teachers:
        raise ValueError("teachers: at least one teacher is needed")
    # MinCE per block with one-hot fallback uses one teacher's rows at every labelled position:
    # the one with the lowest CE (ties: the first), so only its rows are built
    ces = [sequence_ce(t.scores.gold_logprobs) for t in teachers]
    one = (
        options.method is FusionMethod.MIN_CE
        and options.level is FusionLevel.SEQUENCE
        and options.fallback is Fallback.ONEHOT
    )
    best = int(np.argmin(ces))
    rows_for = {best} if one else None
    results = run_teachers(text, target, target_ids, target_offsets, teachers, options, rows_for)
    if one:
        dist = results[best].dist
        assert dist is not None  # rows_for asked for this teacher's rows
        chosen = np.where(dist.present, best, -1).astype(np.int16)
        fused = Fused(ids=dist.ids, probs=dist.probs, chosen=chosen, tail=dist.tail)
    else:
        costs = None
        if options.level is FusionLevel.TOKEN:
            pairs = [r.alignment.pair for r in results]
            costs = token_costs(pairs, [t.scores.gold_logprobs for t in teachers], ces)
        dists = [r.dist for r in results if r.dist is not None]  # every teacher's rows built
        fused = fuse(dists, ces, options.method, options.level, costs)
    return FusedBlock(
        target_ids=np.asarray(target_ids, dtype=np.int32),
        ids=fused.ids,
        probs=fused.probs,
        tail=fused.tail,
        chosen=fused.chosen,
        ce=np.asarray(ces, dtype=np.float32),
        coverage=np.asarray([r.alignment.coverage for r in results], dtype=np.float32),
        teachers=tuple(t.name for t in teachers),
    )
