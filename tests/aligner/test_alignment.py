"""Sequence alignment: hand-worked cases on real tokenizers, the reference DTW, and properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bench.reference import dtw_reference, levenshtein
from fuseserve.aligner.alignment import (
    Anchor,
    align_dtw,
    align_offsets,
    cumulative_cost,
    dtw_path,
    edit_distance_matrix,
)
from fuseserve.aligner.tokenview import context_ends
from fuseserve.aligner.vocabmap import StringMode, build_vocab_map
from tests.conftest import encode


def offsets_alignment(text, target_tok, target, teacher_tok, teacher, t_bos=False, s_bos=False):
    t_ids, t_off = encode(target_tok, text, bos=t_bos)
    s_ids, s_off = encode(teacher_tok, text, bos=s_bos)
    t_ends = context_ends(t_ids, t_off, text, target)
    s_ends = context_ends(s_ids, s_off, text, teacher)
    return t_ids, s_ids, t_ends, s_ends, align_offsets(t_ids, t_ends, s_ends)


# --------------------------------------------------------------------------- hand-worked
def test_digits_and_a_word_split_differently(mistral_tok, mistral, smol_tok, smol):
    text = "In 2024, 1234567 apples"
    t_ids, s_ids, t_ends, s_ends, al = offsets_alignment(text, mistral_tok, mistral, smol_tok, smol)
    # Mistral: ▁In ▁ 2 0 2 4 , ▁ 1 2 3 4 5 6 7 ▁ap ples   (17 tokens)
    # SmolLM2: In  Ġ 2 0 2 4 , Ġ 1 2 3 4 5 6 7 Ġapples     (16 tokens)
    assert len(t_ids) == 17 and len(s_ids) == 16
    assert t_ends.tolist() == [2, *range(3, 17), 19, 23]
    assert s_ends.tolist() == [2, *range(3, 17), 23]
    # Contexts ending at the same byte pair up; '▁ap' (ends at 19) has no teacher twin.
    assert al.pair.tolist() == [*range(15), -1, 15]
    assert al.fallback.tolist() == [*t_ids[1:].tolist(), -1]
    assert al.coverage == pytest.approx(15 / 16)

    dtw = align_dtw(t_ids, s_ids, mistral, smol, target_ends=t_ends, teacher_ends=s_ends)
    # DTW pairs predicted tokens one-to-one. Hand-worked end of the path (edit distances of
    # space-free surfaces): '7'~'7' 0, '7'~'ap' 2, 'apples'~'ap' 4, 'apples'~'ples' 2, so the
    # cheapest path is ('7','7'), ('7','ap'), ('apples','ples') = 4 < 6: teacher '7' serves two
    # target tokens and 'apples' is not one-to-one with '▁ap'. Only t_1..t_13 pair, i.e.
    # positions 0..12.
    assert dtw.pair.tolist() == [*range(13), -1, -1, -1, -1]

    compat = align_dtw(t_ids, s_ids, mistral, smol, anchor=Anchor.INPUT, compat=True)
    # The original: a target token pairs when it sees one teacher token (the teacher may see
    # several) and the strings match after the marker swap ('▁In' ~ 'In' by its GPT-2 special
    # case). '▁ap' sees only '7' and 'ples' only 'Ġapples': one-hot of the *input* token.
    assert compat.pair.tolist() == [*range(15), -1, -1]
    assert compat.fallback.tolist() == t_ids.tolist()


def test_word_split_differently(mistral_tok, mistral, smol_tok, smol):
    text = " unbelievable story"
    t_ids, s_ids, t_ends, s_ends, al = offsets_alignment(text, mistral_tok, mistral, smol_tok, smol)
    assert mistral_tok.convert_ids_to_tokens(t_ids.tolist()) == [
        "▁un",
        "bel",
        "iev",
        "able",
        "▁story",
    ]
    assert smol_tok.convert_ids_to_tokens(s_ids.tolist()) == ["Ġunbelie", "vable", "Ġstory"]
    # Only the context " unbelievable" (13 bytes) exists on both sides.
    assert t_ends.tolist() == [3, 6, 9, 13, 19] and s_ends.tolist() == [8, 13, 19]
    assert al.pair.tolist() == [-1, -1, -1, 1, 2]
    assert al.coverage == pytest.approx(1 / 4)


def test_newline(mistral_tok, mistral, smol_tok, smol):
    text = "a\nb c"
    t_ids, s_ids, t_ends, s_ends, al = offsets_alignment(text, mistral_tok, mistral, smol_tok, smol)
    assert mistral_tok.convert_ids_to_tokens(t_ids.tolist())[:3] == ["▁a", "<0x0A>", "b"]
    assert smol_tok.convert_ids_to_tokens(s_ids.tolist())[:3] == ["a", "Ċ", "b"]
    assert al.pair.tolist()[:3] == [0, 1, 2]
    dtw = align_dtw(t_ids, s_ids, mistral, smol, target_ends=t_ends, teacher_ends=s_ends)
    # '<0x0A>' and 'Ċ' are both '\n': the newline and 'b' are predicted at paired positions.
    assert dtw.pair.tolist()[:2] == [0, 1]


def test_multibyte_character_split_into_byte_tokens(mistral_tok, mistral, smol_tok, smol):
    text = "x ꙮ y"
    _, _, _, _, al = offsets_alignment(text, mistral_tok, mistral, smol_tok, smol)
    # Mistral ends [1, 2, 3, 4, 5, 7] (▁x ▁ <0xEA> <0x99> <0xAE> ▁y),
    # SmolLM2 ends [1, 3, 4, 5, 7]    (x Ġê Ļ ® Ġy): contexts inside the character pair too.
    assert al.pair.tolist() == [0, -1, 1, 2, 3, 4]


def test_bos_on_one_side_only_does_not_shift(mistral_tok, mistral, smol_tok, smol, prose):
    text = prose[:400]
    p_t, p_s, p_te, p_se, plain = offsets_alignment(text, mistral_tok, mistral, smol_tok, smol)
    t_ids, s_ids, t_ends, s_ends, with_bos = offsets_alignment(
        text, mistral_tok, mistral, smol_tok, smol, t_bos=True
    )
    assert with_bos.pair[0] == -1
    np.testing.assert_array_equal(with_bos.pair[1:], plain.pair)
    dtw_plain = align_dtw(p_t, p_s, mistral, smol, target_ends=p_te, teacher_ends=p_se)
    dtw_bos = align_dtw(t_ids, s_ids, mistral, smol, target_ends=t_ends, teacher_ends=s_ends)
    # BOS predicts the first token, which no teacher position predicts: unpaired.
    assert dtw_bos.pair[0] == -1
    np.testing.assert_array_equal(dtw_bos.pair[1:], dtw_plain.pair)
    # and BOS on the teacher side only: teacher positions shift by one, pairs follow them.
    _, _, _, _, teacher_bos = offsets_alignment(
        text, mistral_tok, mistral, smol_tok, smol, s_bos=True
    )
    shifted = np.where(plain.pair >= 0, plain.pair + 1, -1)
    np.testing.assert_array_equal(teacher_bos.pair, shifted)


# --------------------------------------------------------------------------- reference DTW
@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.int64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12), elements=st.integers(0, 4)
    )
)
def test_dtw_equals_reference_on_cost_matrices(cost):
    n, m = cost.shape
    rows = [str(i) for i in range(n)]
    cols = [str(j) for j in range(m)]
    path, _ = dtw_reference(rows, cols, dist=lambda a, b: int(cost[int(a), int(b)]))
    r, c = dtw_path(cost)
    assert list(zip(r.tolist(), c.tolist())) == path


def test_cumulative_cost_is_the_recurrence():
    rng = np.random.default_rng(1)
    cost = rng.integers(0, 9, (30, 41))
    acc = cumulative_cost(cost)
    for i in range(30):
        for j in range(41):
            options = []
            if i and j:
                options.append(acc[i - 1, j - 1])
            if i:
                options.append(acc[i - 1, j])
            if j:
                options.append(acc[i, j - 1])
            assert acc[i, j] == cost[i, j] + (min(options) if options else 0)


def test_edit_distance_matrix_equals_levenshtein(mistral, smol):
    rows = [smol.stripped[i] for i in range(300, 340)]
    cols = [mistral.stripped[i] for i in range(1000, 1030)] + ["", "ä😀"]
    matrix = edit_distance_matrix(rows, cols)
    assert matrix.tolist() == [[levenshtein(a, b) for b in cols] for a in rows]


def test_compat_dtw_path_matches_reference_on_real_text(
    mistral_tok, mistral, smol_tok, smol, prose
):
    t_ids, _ = encode(mistral_tok, prose[:700])
    s_ids, _ = encode(smol_tok, prose[:700])
    rows = [smol.stripped[i] for i in s_ids]
    cols = [mistral.stripped[i] for i in t_ids]
    path, per_col = dtw_reference(rows, cols)
    r, c = dtw_path(edit_distance_matrix(rows, cols))
    assert list(zip(r.tolist(), c.tolist())) == path
    soft = build_vocab_map(smol, mistral, StringMode.FUSELLM).table(soft=True)
    compat = align_dtw(
        t_ids, s_ids, mistral, smol, anchor=Anchor.INPUT, soft_table=soft, compat=True
    )
    for i, teacher_rows in enumerate(per_col):
        if compat.pair[i] >= 0:
            assert teacher_rows == [compat.pair[i]]


# --------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 3000), length=st.integers(1, 600))
def test_offsets_alignment_is_monotone_and_exact(
    mistral_tok, mistral, smol_tok, smol, prose, start, length
):
    text = prose[start : start + length]
    _t_ids, s_ids, t_ends, s_ends, al = offsets_alignment(
        text, mistral_tok, mistral, smol_tok, smol
    )
    paired = al.pair >= 0
    assert np.all(np.diff(al.pair[paired]) > 0)  # monotone, one-to-one
    assert np.all(t_ends[paired] == s_ends[al.pair[paired]])  # same prefix text
    assert np.all((al.pair >= -1) & (al.pair < len(s_ids)))


@settings(max_examples=15, deadline=None)
@given(start=st.integers(0, 3000), length=st.integers(1, 300))
def test_same_tokenizer_aligns_to_identity(mistral_tok, mistral, prose, start, length):
    text = prose[start : start + length]
    ids, off = encode(mistral_tok, text, bos=True)
    ends = context_ends(ids, off, text, mistral)
    off_al = align_offsets(ids, ends, ends)
    np.testing.assert_array_equal(off_al.pair, np.arange(len(ids)))
    dtw = align_dtw(ids, ids, mistral, mistral, target_ends=ends, teacher_ends=ends)
    expected = np.arange(len(ids))
    expected[-1] = -1  # nothing predicts past the end under the next-token anchor
    np.testing.assert_array_equal(dtw.pair, expected)
