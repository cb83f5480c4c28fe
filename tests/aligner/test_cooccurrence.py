"""Co-occurrence refinement of the vocabulary map: counting by hand, and on real tokenizers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fuseserve.aligner.cooccurrence import (
    build_refined_map,
    coalignment_counts,
    refine_vocab_map,
)
from fuseserve.aligner.vocabmap import StringMode, VocabMap, build_vocab_map
from fuseserve.aligner.vocabmap_store import VocabMapStore


def test_tokens_starting_at_the_same_byte_co_align():
    # text of 6 bytes; teacher: [10: bytes 0-3][11: 3-6]; target: [20: 0-3][21: 3-5][22: 5-6]
    enc = (np.array([10, 11]), np.array([3, 6]), np.array([20, 21, 22]), np.array([3, 5, 6]))
    counts = coalignment_counts([enc, enc], target_vocab=100)
    assert counts == {10 * 100 + 20: 2, 11 * 100 + 21: 2}
    # a leading BOS (context end 0) starts nothing itself, the first token still starts at 0
    bos = (np.array([1, 10]), np.array([0, 3]), np.array([20]), np.array([3]))
    assert coalignment_counts([bos], 100) == {10 * 100 + 20: 1}


def test_refinement_replaces_inexact_entries_seen_often_enough():
    vmap = VocabMap(
        "t", "T", StringMode.SURFACE,
        target_ids=np.array([5, 6, 7], dtype=np.int32),
        exact=np.array([True, False, False]),
        distance=np.array([0, 2, 3], dtype=np.int32),
    )  # fmt: skip
    counts = {0 * 50 + 9: 10, 1 * 50 + 8: 3, 1 * 50 + 4: 3, 2 * 50 + 9: 1}
    refined = refine_vocab_map(vmap, counts, target_vocab=50, corpus_fingerprint="c", min_count=2)
    # 0 is exact (pinned); 1: tie 3/3 goes to the lower target id 4; 2: seen once, kept
    assert refined.target_ids.tolist() == [5, 4, 7]
    again = VocabMap.from_bytes(refined.to_bytes())
    assert again.corpus == "c" and again.target_ids.tolist() == [5, 4, 7]


def test_real_tokenizers_refined_entries_are_the_in_context_first_tokens(
    smol, smol_tok, mistral, mistral_tok, prose
):
    vmap = build_vocab_map(smol, mistral)
    texts = [prose[i : i + 2000] for i in range(0, len(prose) - 2000, 2000)]
    refined = build_refined_map(vmap, texts, smol_tok, mistral_tok, smol, mistral)
    changed = np.nonzero(refined.target_ids != vmap.target_ids)[0]
    assert len(changed) > 0 and not vmap.exact[changed].any()
    for teacher_id in changed[:20]:
        # the refined target token's text is a prefix of the teacher token's text
        s_text = smol.surfaces[teacher_id]
        t_text = mistral.surfaces[refined.target_ids[teacher_id]]
        assert s_text.startswith(t_text.lstrip(" ") if not s_text.startswith(" ") else t_text)


@pytest.mark.slow
def test_cli_builds_and_stores_the_refined_map(tmp_path, prose, smol, mistral):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(prose)
    out = tmp_path / "maps"
    done = subprocess.run(
        [
            sys.executable, "-m", "fuseserve.cli", "vocab-map",
            "--teacher", "shipped:smollm2", "--target", "shipped:mistral-v1",
            "--out-dir", str(out), "--cooc-corpus", str(corpus),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "re-ranked" in done.stdout
    refined = VocabMapStore(out).load(smol, mistral, StringMode.SURFACE, cooc=True)
    assert refined is not None and refined.corpus
