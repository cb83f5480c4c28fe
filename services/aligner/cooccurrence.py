"""Co-occurrence refinement of a vocabulary map (the statistics-based alternative to plain MinED).

On a corpus tokenised by both tokenizers, a teacher token and a target token *co-align* when they
start at the same byte of the text: in context, that target token is how the target begins the
text the teacher token stands for. Counting these pairs over the corpus and mapping every teacher
token seen at least ``min_count`` times to its most frequent partner re-ranks the MinED guesses
with evidence from real text; exact matches (EM) stay pinned, and tokens the corpus never shows
keep their MinED entry.

Covers the counting (from token ids and byte context ends, pure numpy) and the refined map.
Leaves out: tokenising the corpus (callers pass encodings) and storing maps (``vocabmap_store``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from fuseserve.aligner.vocabmap import StringMode, VocabMap

if TYPE_CHECKING:
    from fuseserve.aligner.tokenview import TokenizerView

Encoding = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(teacher ids [m], teacher byte ends [m], target ids [n], target byte ends [n]) of one text."""


def _starts(ends: np.ndarray) -> np.ndarray:
    """Byte where each token starts: the previous token's end (0 for the first); -1 for specials."""
    ends = np.asarray(ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    valid = np.concatenate([[True], ends[:-1] >= 0]) & (ends > 0)
    return np.where(valid, starts, -1)


def coalignment_counts(encodings: Iterable[Encoding], target_vocab: int) -> dict[int, int]:
    """{teacher_id * target_vocab + target_id: count} over every text's co-aligned token pairs."""
    keys = []
    for s_ids, s_ends, t_ids, t_ends in encodings:
        s_start, t_start = _starts(s_ends), _starts(t_ends)
        s_ok, t_ok = np.nonzero(s_start >= 0)[0], np.nonzero(t_start >= 0)[0]
        _, si, ti = np.intersect1d(
            s_start[s_ok], t_start[t_ok], assume_unique=False, return_indices=True
        )
        keys.append(
            np.asarray(s_ids, dtype=np.int64)[s_ok[si]] * target_vocab
            + np.asarray(t_ids, dtype=np.int64)[t_ok[ti]]
        )
    if not keys:
        return {}
    unique, counts = np.unique(np.concatenate(keys), return_counts=True)
    return dict(zip(unique.tolist(), counts.tolist()))


def refine_vocab_map(
    vmap: VocabMap,
    counts: dict[int, int],
    target_vocab: int,
    corpus_fingerprint: str,
    min_count: int = 2,
) -> VocabMap:
    """The map with every inexact entry seen ``min_count`` times replaced by its most frequent
    co-aligned target token (ties: the lower target id)."""
    if vmap.mode is not StringMode.SURFACE:
        raise ValueError("vmap: co-occurrence refines the `surface` map")
    target_ids = vmap.target_ids.copy()
    best: dict[int, tuple[int, int]] = {}
    for key, count in counts.items():
        teacher, target = divmod(key, target_vocab)
        current = best.get(teacher)
        if current is None or count > current[0] or (count == current[0] and target < current[1]):
            best[teacher] = (count, target)
    for teacher, (count, target) in best.items():
        if count >= min_count and not vmap.exact[teacher]:
            target_ids[teacher] = target
    return VocabMap(
        teacher_fingerprint=vmap.teacher_fingerprint,
        target_fingerprint=vmap.target_fingerprint,
        mode=vmap.mode,
        target_ids=target_ids,
        exact=vmap.exact,
        distance=vmap.distance,
        corpus=corpus_fingerprint,
    )


def corpus_fingerprint(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass") + b"\x1e")
    return h.hexdigest()[:16]


def _hf_encode(tok: Any, view: TokenizerView, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, byte context ends) of ``text`` with a Hugging Face tokenizer (duck-typed)."""
    from fuseserve.aligner.tokenview import context_ends

    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ids, context_ends(ids, offsets, text, view)


def hf_encodings(
    texts: Iterable[str],
    teacher_tokenizer: Any,
    target_tokenizer: Any,
    teacher: TokenizerView,
    target: TokenizerView,
) -> Iterator[Encoding]:
    """``Encoding`` of each text with two Hugging Face tokenizers (duck-typed) and their views."""
    for text in texts:
        yield (
            *_hf_encode(teacher_tokenizer, teacher, text),
            *_hf_encode(target_tokenizer, target, text),
        )


def build_refined_map(
    vmap: VocabMap,
    texts: list[str],
    teacher_tokenizer: Any,
    target_tokenizer: Any,
    teacher: TokenizerView,
    target: TokenizerView,
    min_count: int = 2,
) -> VocabMap:
    """Count co-alignments over ``texts`` with the two tokenizers and refine ``vmap``."""
    encodings = hf_encodings(texts, teacher_tokenizer, target_tokenizer, teacher, target)
    counts = coalignment_counts(encodings, target.vocab_size)
    return refine_vocab_map(vmap, counts, target.vocab_size, corpus_fingerprint(texts), min_count)
