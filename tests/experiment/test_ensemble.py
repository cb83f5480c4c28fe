"""The ensemble baseline: hand-worked cases, and real models (a model with itself is itself)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fuseserve.experiment.ensemble import chunk_logprobs, ensemble_bits, ensemble_bpb
from fuseserve.trainer.evaluate import evaluate_domains


def test_shared_tokenizer_is_the_average_of_next_token_probabilities():
    # text "ab": both models cut it into "a" | "b" (byte ends 1, 2)
    # model A: p(a) = 0.5, p(b | a) = 0.5; model B: p(a) = 0.25, p(b | a) = 1.0
    lp = [np.log([0.5, 0.5]), np.log([0.25, 1.0])]
    ends = [np.array([1, 2]), np.array([1, 2])]
    chunks = chunk_logprobs(lp, ends)
    np.testing.assert_allclose(np.exp(chunks), [[0.5, 0.25], [0.5, 1.0]])
    # ensemble: p(a) = (0.5 + 0.25) / 2 = 0.375, p(b | a) = (0.5 + 1) / 2 = 0.75
    assert ensemble_bits(chunks) == pytest.approx(-math.log2(0.375 * 0.75))


def test_different_tokenizers_average_over_shared_boundaries():
    # text "abcd": A cuts "ab" | "c" | "d" (ends 2, 3, 4), B cuts "a" | "bc" | "d" (ends 1, 3, 4)
    # shared ends: 3, 4 -> chunks "abc" and "d"
    lp = [np.log([0.5, 0.4, 0.9]), np.log([0.2, 0.1, 0.3])]
    ends = [np.array([2, 3, 4]), np.array([1, 3, 4])]
    chunks = chunk_logprobs(lp, ends)
    np.testing.assert_allclose(np.exp(chunks), [[0.5 * 0.4, 0.2 * 0.1], [0.9, 0.3]])
    expected = -math.log2((0.2 + 0.02) / 2) - math.log2((0.9 + 0.3) / 2)
    assert ensemble_bits(chunks) == pytest.approx(expected)


def test_one_model_is_its_own_ensemble():
    lp = [np.log([0.3, 0.6, 0.1])]
    assert ensemble_bits(chunk_logprobs(lp, [np.array([2, 5, 6])])) == pytest.approx(
        -math.log2(0.3 * 0.6 * 0.1)
    )


def test_models_that_cover_different_text_are_refused():
    with pytest.raises(ValueError, match="same text"):
        chunk_logprobs([np.zeros(2), np.zeros(2)], [np.array([1, 2]), np.array([1, 3])])
    with pytest.raises(ValueError, match="unpredicted"):
        chunk_logprobs([np.array([np.nan, 0.0])], [np.array([1, 2])])


@pytest.mark.slow
def test_real_models_ensemble_with_itself_equals_its_bpb_and_mixes_two(tiny_dirs, prose):
    domains = {"prose": [prose[:1500], prose[3000:4200]]}
    spm, bpe = str(tiny_dirs["spm"]), str(tiny_dirs["bpe"])
    alone = evaluate_domains(spm, domains, 128, show_progress=False)["prose"].value
    assert ensemble_bpb([spm, spm], domains, 128)["prose"] == pytest.approx(alone, rel=1e-6)
    # two tokenizers: per chunk the average of two probabilities is at least their geometric
    # mean, so the ensemble's bits are at most the mean of the two models' bits
    other = evaluate_domains(bpe, domains, 128, show_progress=False)["prose"].value
    mixed = ensemble_bpb([spm, bpe], domains, 128)["prose"]
    assert mixed <= (alone + other) / 2 + 1e-9
