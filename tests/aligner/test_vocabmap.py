"""EM and MinED vocabulary maps, checked against the per-pair reference on real tokenizers."""

import numpy as np
import pytest

from bench.reference import levenshtein, min_ed_reference
from fuseserve.aligner.tokenview import Scheme, TokenizerView
from fuseserve.aligner.vocabmap import StringMode, VocabMap, build_vocab_map
from fuseserve.wire.codec import CodecError


@pytest.fixture(scope="module")
def smol_to_mistral(smol, mistral):
    return build_vocab_map(smol, mistral, StringMode.SURFACE)


@pytest.fixture(scope="module")
def smol_to_mistral_fusellm(smol, mistral):
    return build_vocab_map(smol, mistral, StringMode.FUSELLM)


@pytest.mark.parametrize(
    ("teacher_token", "target_token"),
    [("Ġworld", "▁world"), ("Ċ", "<0x0A>"), ("ĠcafÃ©", "▁café"), ("Ģ", "<0x80>"), (",", ",")],
)
def test_exact_matches_by_surface(smol, mistral, smol_to_mistral, teacher_token, target_token):
    i = smol.id_of[teacher_token]
    assert smol_to_mistral.exact[i]
    assert mistral.tokens[smol_to_mistral.target_ids[i]] == target_token


def test_ordinary_piece_preferred_over_byte_piece(smol, mistral, smol_to_mistral):
    # 'A' exists both as the piece 'A' and the byte piece <0x41> in Mistral v1.
    target = mistral.tokens[smol_to_mistral.target_ids[smol.id_of["A"]]]
    assert target == "A"


def test_specials_map_by_role(smol, mistral, smol_to_mistral):
    assert smol_to_mistral.target_ids[smol.eos_id] == mistral.eos_id


def test_min_ed_agrees_with_per_pair_loop(smol, mistral, smol_to_mistral):
    by_surface: dict[str, int] = {}
    for i, s in enumerate(mistral.surfaces):
        if (
            not mistral.is_special[i]
            and s
            and (
                s not in by_surface
                or (mistral.is_byte_piece[by_surface[s]] and not mistral.is_byte_piece[i])
            )
        ):
            by_surface[s] = i
    ordered = sorted(by_surface.items(), key=lambda kv: kv[1])
    choices = [s for s, _ in ordered]
    inexact = np.nonzero(~smol_to_mistral.exact & (smol_to_mistral.target_ids >= 0))[0]
    rng = np.random.default_rng(7)
    for i in rng.choice(inexact, 25, replace=False):
        index, distance = min_ed_reference(smol.surfaces[i], choices)
        assert smol_to_mistral.target_ids[i] == ordered[index][1]
        assert smol_to_mistral.distance[i] == distance


def test_fusellm_mode_swaps_markers(smol, mistral, smol_to_mistral_fusellm):
    vm = smol_to_mistral_fusellm
    i = smol.id_of["Ġworld"]
    assert vm.exact[i] and mistral.tokens[vm.target_ids[i]] == "▁world"
    # 'Ċ' has no marker; the raw string is not in Mistral's vocabulary, so MinED picks a token
    # at distance 1 (the lowest id among them).
    j = smol.id_of["Ċ"]
    assert not vm.exact[j]
    chosen = mistral.tokens[vm.target_ids[j]]
    assert levenshtein("Ċ", chosen) == vm.distance[j] == 1
    assert all(levenshtein("Ċ", t) > 1 for t in mistral.tokens[: vm.target_ids[j]])


def test_ties_go_to_lowest_target_id():
    target = TokenizerView("t", Scheme.BYTE_LEVEL, ("ab", "xb", "ay"))
    teacher = TokenizerView("s", Scheme.BYTE_LEVEL, ("zb", "ab", "xy"))
    vm = build_vocab_map(teacher, target)
    # 'zb' is at distance 1 from 'ab' (id 0) and 'xb' (id 1): id 0 wins.
    # 'xy' is at distance 1 from 'xb' (id 1) and 'ay' (id 2): id 1 wins.
    assert vm.target_ids.tolist() == [0, 0, 1]
    assert vm.exact.tolist() == [False, True, False]
    assert vm.table(soft=False).tolist() == [-1, 0, -1]


def test_identity_map_for_the_same_tokenizer(mistral):
    vm = build_vocab_map(mistral, mistral)
    ordinary = ~mistral.is_special
    np.testing.assert_array_equal(vm.target_ids[ordinary], np.arange(mistral.vocab_size)[ordinary])
    assert vm.exact[ordinary].all()


def test_serialisation_roundtrip(smol_to_mistral):
    back = VocabMap.from_bytes(smol_to_mistral.to_bytes())
    assert back.teacher_fingerprint == smol_to_mistral.teacher_fingerprint
    assert back.mode is StringMode.SURFACE
    np.testing.assert_array_equal(back.target_ids, smol_to_mistral.target_ids)
    with pytest.raises(CodecError):
        VocabMap.from_bytes(smol_to_mistral.to_bytes()[:-3])
