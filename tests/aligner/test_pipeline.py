"""Whole-block fusion on real tokenizers: identity, the fusellm preset vs the reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bench.reference import fusellm_transform_reference
from fuseserve.aligner.options import FusionOptions
from fuseserve.aligner.pipeline import TeacherInput, fuse_block
from fuseserve.aligner.vocabmap import StringMode, build_vocab_map
from fuseserve.wire.messages import TeacherScores
from tests.conftest import encode


def fake_scores(tokenizer, text, vocab_size, k, seed, bos=False) -> TeacherScores:
    """Real tokenization, synthetic top-k: distinct ids, descending log-probs of a softmax."""
    rng = np.random.default_rng(seed)
    ids, offsets = encode(tokenizer, text, bos=bos)
    m = len(ids)
    topk = np.stack([rng.choice(vocab_size, k, replace=False) for _ in range(m)])
    logits = np.sort(rng.normal(size=(m, k)) * 2, axis=1)[:, ::-1]
    logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True) + rng.random((m, 1)) * 3)
    gold = np.append(-rng.random(m - 1) * 4, np.nan)
    return TeacherScores(
        token_ids=ids.astype(np.int32),
        offsets=offsets.astype(np.int32),
        topk_ids=topk.astype(np.int32),
        topk_logprobs=logprobs.astype(np.float32),
        gold_logprobs=gold.astype(np.float32),
    )


@pytest.fixture(scope="module")
def maps(smol, mistral):
    return {
        "surface": build_vocab_map(smol, mistral, StringMode.SURFACE),
        "fusellm": build_vocab_map(smol, mistral, StringMode.FUSELLM),
        "self": build_vocab_map(mistral, mistral, StringMode.SURFACE),
    }


@settings(max_examples=20, deadline=None)
@given(
    start=st.integers(0, 3000),
    length=st.integers(2, 500),
    seed=st.integers(0, 1000),
    alignment=st.sampled_from(["offsets", "dtw"]),
    temperature=st.sampled_from([1.0, 0.7, 2.0]),
)
def test_same_tokenizer_gives_the_teachers_own_renormalised_topk(
    mistral_tok, mistral, maps, prose, start, length, seed, alignment, temperature
):
    text = prose[start : start + length]
    scores = fake_scores(mistral_tok, text, mistral.vocab_size, 5, seed, bos=True)
    if len(scores.token_ids) < 2:
        return
    teacher = TeacherInput("self", mistral, maps["self"], scores)
    options = FusionOptions(alignment=alignment, temperature=temperature)
    block = fuse_block(text, mistral, scores.token_ids, scores.offsets, [teacher], options)
    n = len(scores.token_ids)
    for i in range(n - 1):
        lp = scores.topk_logprobs[i].astype(np.float64) / temperature
        p = np.exp(lp - lp.max())
        p /= p.sum()
        expected = dict(zip(scores.topk_ids[i].tolist(), p))
        got = {int(t): float(q) for t, q in zip(block.ids[i], block.probs[i]) if t >= 0}
        assert got.keys() == expected.keys()
        for t, q in got.items():
            assert q == pytest.approx(expected[t], abs=1e-5)
    assert block.ids[n - 1, 0] == -1  # nothing to predict past the block
    assert block.coverage[0] == pytest.approx(1.0)
    assert block.chosen[: n - 1].tolist() == [0] * (n - 1)


def test_fusellm_preset_equals_the_original_transform(
    mistral_tok, smol_tok, mistral, smol, maps, prose
):
    text = prose[100:900]
    scores = fake_scores(smol_tok, text, smol.vocab_size, 6, seed=3)
    t_ids, t_off = encode(mistral_tok, text)
    options = FusionOptions.preset("fusellm")
    vmap = maps["fusellm"]
    block = fuse_block(
        text, mistral, t_ids, t_off, [TeacherInput("smol", smol, vmap, scores)], options
    )
    soft_mapping = {
        smol.tokens[i].replace("Ġ", "▁"): mistral.tokens[vmap.target_ids[i]]
        for i in range(smol.vocab_size)
    }
    reference = fusellm_transform_reference(
        [mistral.tokens[i] for i in t_ids],
        [smol.tokens[i] for i in scores.token_ids],
        "▁",
        "Ġ",
        {tok: i for i, tok in enumerate(mistral.tokens)},
        smol.tokens,
        scores.topk_ids.tolist(),
        scores.topk_logprobs.tolist(),
        soft_mapping,
        teacher_is_byte_level=True,
    )
    aligned = 0
    for i, (ref_ids, ref_values) in enumerate(reference):
        if ref_values == [1.0] and len(ref_ids) == 1 and ref_ids[0] == t_ids[i]:
            expected = {ref_ids[0]: 1.0}  # one-hot of the input token (the original off-by-one)
        else:
            v = np.array(ref_values, dtype=np.float64)
            p = np.exp(v - v.max())
            expected = dict(zip(ref_ids, p / p.sum()))
            aligned += 1
        got = {int(t): float(q) for t, q in zip(block.ids[i], block.probs[i]) if t >= 0}
        assert got.keys() == expected.keys(), i
        for t, q in got.items():
            assert q == pytest.approx(expected[t], abs=1e-5)
    assert aligned > len(t_ids) // 2  # the text is mostly aligned, not one-hot


def test_two_teachers_min_ce_picks_the_lower_ce(mistral_tok, smol_tok, mistral, smol, maps, prose):
    text = prose[2000:3500]
    t_ids, t_off = encode(mistral_tok, text)
    a = fake_scores(smol_tok, text, smol.vocab_size, 10, seed=1)
    b = fake_scores(mistral_tok, text, mistral.vocab_size, 10, seed=2)
    teachers = [
        TeacherInput("smol", smol, maps["surface"], a),
        TeacherInput("mistral", mistral, maps["self"], b),
    ]
    block = fuse_block(text, mistral, t_ids, t_off, teachers)
    best = int(np.argmin(block.ce))
    labelled = block.ids[:, 0] >= 0
    assert set(block.chosen[labelled].tolist()) == {best}
    np.testing.assert_allclose(block.probs[labelled].sum(1), 1.0, atol=1e-5)
    assert block.ids.max() < mistral.vocab_size
    assert 0 < block.coverage[0] < 1 and block.coverage[1] == pytest.approx(1.0)
    avg = fuse_block(text, mistral, t_ids, t_off, teachers, FusionOptions(method="avg_ce"))
    np.testing.assert_allclose(avg.probs[labelled].sum(1), 1.0, atol=1e-5)
    assert avg.ids.shape[1] == 20


def test_options_errors_name_the_field(mistral, smol, maps):
    with pytest.raises(ValidationError, match="anchor"):
        FusionOptions(alignment="offsets", anchor="input")
    with pytest.raises(ValidationError, match="temperature"):
        FusionOptions(temperature=0)
    with pytest.raises(ValidationError, match="method"):
        FusionOptions(method="majority")
    with pytest.raises(ValidationError, match="colour"):
        FusionOptions(colour="red")
    with pytest.raises(ValueError, match="unknown preset"):
        FusionOptions.preset("nope")


def test_mismatched_vocab_map_is_refused(mistral_tok, mistral, smol, maps):
    text = "hello world"
    scores = fake_scores(mistral_tok, text, mistral.vocab_size, 3, seed=0)
    t_ids, t_off = encode(mistral_tok, text)
    wrong = TeacherInput("x", mistral, maps["surface"], scores)  # a map built for SmolLM2
    with pytest.raises(ValueError, match="another tokenizer"):
        fuse_block(text, mistral, t_ids, t_off, [wrong])
    mode = TeacherInput("x", smol, maps["fusellm"], scores)
    with pytest.raises(ValueError, match="mode"):
        fuse_block(text, mistral, t_ids, t_off, [mode])
