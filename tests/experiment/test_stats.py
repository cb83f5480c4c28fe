"""Seeds, the 2-std rule and token efficiency, on hand-worked numbers."""

from __future__ import annotations

import pytest

from fuseserve.experiment.stats import (
    significantly_lower,
    summarize,
    token_efficiency,
    tokens_to_reach,
)


def test_summary_uses_the_sample_std():
    s = summarize([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert str(s) == "2.0000 ± 1.0000"
    assert str(summarize([1.5])) == "1.5000"


def test_significance_needs_more_than_two_std_of_both():
    a, b = summarize([1.0, 1.2]), summarize([2.0, 2.02])  # std 0.141 and 0.014
    assert significantly_lower(a, b)  # 1.1 below 2.01: far beyond 2 x 0.141
    assert not significantly_lower(b, a)
    near = summarize([1.25, 1.35])
    assert not significantly_lower(a, near)  # 0.2 apart, but 2 std = 0.28


def test_tokens_to_reach_interpolates_between_evaluations():
    tokens, bpb = [0, 100, 200, 300], [3.0, 2.5, 2.0, 1.9]
    assert tokens_to_reach(tokens, bpb, 2.25) == pytest.approx(150.0)
    assert tokens_to_reach(tokens, bpb, 3.5) == 0.0
    assert tokens_to_reach(tokens, bpb, 1.0) is None


def test_token_efficiency_against_the_baseline_final_bpb():
    baseline = ([0, 100, 200, 400], [3.0, 2.8, 2.6, 2.4])
    run = ([0, 100, 200, 400], [3.0, 2.6, 2.2, 2.0])
    # the run reaches 2.4 half-way between 100 (2.6) and 200 (2.2): 150 tokens of 400
    assert token_efficiency(*run, *baseline) == pytest.approx(150 / 400)
    assert token_efficiency(*baseline, *run) is None
