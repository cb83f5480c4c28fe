"""Projection through a vocabulary map and the two fusion functions, on hand-worked numbers."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuseserve.aligner.alignment import Alignment
from fuseserve.aligner.fusion import FusionLevel, FusionMethod, fuse, sequence_ce, token_costs
from fuseserve.aligner.projection import DuplicateRule, Fallback, SparseDist, project

LP = np.log


def test_duplicates_add_their_mass_or_keep_the_first():
    # One position; teacher top-3 ids 0, 1, 2 with probs .5 .3 .2; ids 0 and 2 both map to 7.
    al = Alignment(pair=np.array([0]), fallback=np.array([9]))
    ids = np.array([[0, 1, 2]])
    lps = LP(np.array([[0.5, 0.3, 0.2]]))
    table = np.array([7, 8, 7], dtype=np.int32)
    summed = project(al, ids, lps, table)
    assert summed.ids[0].tolist() == [7, 8, -1]
    np.testing.assert_allclose(summed.probs[0], [0.7, 0.3, 0.0], atol=1e-6)
    first = project(al, ids, lps, table, duplicates=DuplicateRule.FIRST)
    # keep .5 for id 7 and .3 for id 8, renormalised over what is kept: 5/8 and 3/8
    assert first.ids[0].tolist() == [7, 8, -1]
    np.testing.assert_allclose(first.probs[0], [0.625, 0.375, 0.0], atol=1e-6)


def test_unmapped_ids_are_dropped_and_renormalised():
    al = Alignment(pair=np.array([0]), fallback=np.array([9]))
    out = project(al, np.array([[0, 1]]), LP(np.array([[0.6, 0.2]])), np.array([-1, 3]))
    assert out.ids[0].tolist() == [3, -1] and out.probs[0, 0] == pytest.approx(1.0)
    # nothing mappable: one-hot fallback, not aligned
    out = project(al, np.array([[0, 0]]), LP(np.array([[0.6, 0.2]])), np.array([-1, 3]))
    assert out.ids[0].tolist() == [9, -1] and not out.aligned[0]


def test_temperature():
    al = Alignment(pair=np.array([0]), fallback=np.array([9]))
    lps = LP(np.array([[0.8, 0.2]]))
    out = project(al, np.array([[0, 1]]), lps, np.array([0, 1]), temperature=2.0)
    # softmax(log p / 2) = sqrt(p) / sum sqrt(p)
    expected = np.sqrt([0.8, 0.2]) / np.sqrt([0.8, 0.2]).sum()
    np.testing.assert_allclose(out.probs[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        project(al, np.array([[0, 1]]), lps, np.array([0, 1]), temperature=0)


def test_fallbacks_and_unlabelled_positions():
    al = Alignment(pair=np.array([-1, 0, 1]), fallback=np.array([4, 5, -1]))
    ids = np.array([[0, 1], [1, 0]])
    lps = LP(np.array([[0.9, 0.1], [0.9, 0.1]]))
    out = project(al, ids, lps, np.array([10, 11]))
    assert out.ids[:, 0].tolist() == [4, 10, -1]  # one-hot, teacher, nothing (no label)
    assert out.aligned.tolist() == [False, True, False]
    missing = project(al, ids, lps, np.array([10, 11]), fallback=Fallback.MISSING)
    assert missing.present.tolist() == [False, True, False]


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 20),
    m=st.integers(1, 20),
    k=st.integers(1, 6),
    vocab=st.integers(2, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_projection_properties(n, m, k, vocab, seed):
    rng = np.random.default_rng(seed)
    pair = np.where(rng.random(n) < 0.7, rng.integers(0, m, n), -1)
    fallback = np.where(rng.random(n) < 0.9, rng.integers(0, vocab, n), -1)
    ids = rng.integers(0, 40, (m, k))
    logits = rng.normal(size=(m, k)) * 3
    lps = logits - np.log(np.exp(logits).sum(1, keepdims=True) + 5)
    table = np.where(rng.random(40) < 0.8, rng.integers(0, vocab, 40), -1).astype(np.int32)
    for rule in DuplicateRule:
        out = project(Alignment(pair, fallback), ids, lps, table, duplicates=rule)
        sums = out.probs.sum(1)
        present = out.present
        np.testing.assert_allclose(sums[present], 1.0, atol=1e-5)
        assert np.all(sums[~present] == 0)
        assert np.all((out.ids >= -1) & (out.ids < vocab))
        assert np.all(out.probs[out.ids < 0] == 0)
        # ids unique within a row, sorted by decreasing probability
        for row_ids, row_p in zip(out.ids, out.probs):
            real = row_ids[row_ids >= 0]
            assert len(set(real.tolist())) == len(real)
            assert np.all(np.diff(row_p[: len(real)]) <= 1e-7)
        assert np.all(present[fallback >= 0])


def dist(rows):
    """SparseDist from rows of {id: prob}, width 3."""
    ids = np.full((len(rows), 3), -1, np.int32)
    probs = np.zeros((len(rows), 3), np.float32)
    for i, row in enumerate(rows):
        for j, (t, p) in enumerate(sorted(row.items(), key=lambda kv: -kv[1])):
            ids[i, j], probs[i, j] = t, p
    return SparseDist(ids, probs, np.array([bool(r) for r in rows]))


def test_min_ce_sequence_and_token_level():
    a = dist([{1: 1.0}, {2: 0.5, 3: 0.5}])
    b = dist([{4: 1.0}, {5: 1.0}])
    fused = fuse([a, b], ce=[2.0, 1.0])
    assert fused.chosen.tolist() == [1, 1] and fused.ids[:, 0].tolist() == [4, 5]
    costs = np.array([[0.5, 3.0], [1.0, 1.0]])
    fused = fuse([a, b], ce=[2.0, 1.0], level=FusionLevel.TOKEN, costs=costs)
    assert fused.chosen.tolist() == [0, 1]
    tie = fuse([a, b], ce=[1.0, 1.0])
    assert tie.chosen.tolist() == [0, 0]  # ties go to the lower index
    with pytest.raises(ValueError, match="costs"):
        fuse([a, b], ce=[1.0, 1.0], level=FusionLevel.TOKEN)


def test_min_ce_skips_teachers_without_a_distribution():
    a = dist([{}, {2: 1.0}])
    b = dist([{4: 1.0}, {5: 1.0}])
    fused = fuse([a, b], ce=[1.0, 2.0])
    assert fused.chosen.tolist() == [1, 0]
    none = fuse([dist([{}])], ce=[1.0])
    assert none.chosen.tolist() == [-1] and none.ids[0, 0] == -1


def test_avg_ce_weights_are_softmax_of_exp_minus_ce():
    a = dist([{1: 1.0}])
    b = dist([{1: 0.5, 2: 0.5}])
    ce = [0.5, 2.0]
    fused = fuse([a, b], ce=ce, method=FusionMethod.AVG_CE)
    s = np.exp(-np.array(ce))
    w = np.exp(s) / np.exp(s).sum()
    # id 1: w_a * 1 + w_b * .5 ; id 2: w_b * .5
    assert fused.ids[0, :2].tolist() == [1, 2]
    np.testing.assert_allclose(fused.probs[0, :2], [w[0] + 0.5 * w[1], 0.5 * w[1]], atol=1e-6)
    assert fused.chosen.tolist() == [-1]


def test_ce_and_token_costs():
    assert sequence_ce(np.array([-1.0, -3.0, np.nan])) == pytest.approx(2.0)
    assert math.isinf(sequence_ce(np.array([np.nan])))
    costs = token_costs([np.array([1, -1, 0])], [np.array([-0.5, -2.0])], [1.25])
    assert costs.tolist() == [[2.0, 1.25, 0.5]]
