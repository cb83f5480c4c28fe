"""Target ids -> text + offsets (``fuseserve.aligner.idstext``): hand-worked cases on the shipped
Mistral v1 SentencePiece and SmolLM2 byte-level BPE tokenizers, and the tokenizers' own text and
offset mapping for the canonical ids of real text."""

from __future__ import annotations

import pydoc_data.topics

import numpy as np
import pytest

from fuseserve.aligner.idstext import adds_prefix_space, text_of_ids


def ids_of(view, *tokens: str) -> list[int]:
    return [view.id_of[t] for t in tokens]


def check(result, text: str, offsets: list[tuple[int, int]], replaced: int = 0) -> None:
    assert result.text == text
    assert result.offsets.tolist() == [list(o) for o in offsets]
    assert result.offsets.dtype == np.int64
    assert result.replaced == replaced


def test_prefix_space_probe(mistral_tok, mistral, smol_tok, smol):
    assert adds_prefix_space(mistral_tok, mistral)  # "a" -> "▁a": the dummy prefix
    assert not adds_prefix_space(smol_tok, smol)


def test_sentencepiece_words_and_dummy_prefix(mistral):
    # "▁Hello" opens the text: its space is the dummy prefix, not text; "▁world" keeps its space
    ids = ids_of(mistral, "▁Hello", "▁world")
    check(text_of_ids(ids, mistral, True), "Hello world", [(0, 5), (5, 11)])
    # without the dummy-prefix convention the space is text
    check(text_of_ids(ids, mistral, False), " Hello world", [(0, 6), (6, 12)])


def test_sentencepiece_not_canonical(mistral):
    # "Hello" cut as a sampler might: "▁H" + "ello" (the tokenizer would say "▁Hello")
    ids = ids_of(mistral, "▁H", "ello", "▁▁", "x")
    check(text_of_ids(ids, mistral, True), "Hello  x", [(0, 1), (1, 5), (5, 7), (7, 8)])


def test_byte_fallback_pieces_of_one_character(mistral):
    # U+20AC "€" as its three UTF-8 bytes: each piece covers the whole character
    ids = ids_of(mistral, "▁a", "<0xE2>", "<0x82>", "<0xAC>", "b")
    check(text_of_ids(ids, mistral, True), "a€b", [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)])


def test_dummy_space_alone_covers_the_first_character(mistral):
    # "\nfoo" -> "▁" (the dummy prefix, alone) + "<0x0A>" + "foo", offsets as the tokenizer has
    ids = ids_of(mistral, "▁", "<0x0A>", "foo")
    check(text_of_ids(ids, mistral, True), "\nfoo", [(0, 1), (0, 1), (1, 4)])


def test_invalid_utf8_from_sampling_becomes_replacement_characters(mistral):
    # two of the three bytes of "€", then "b": each stray byte is one U+FFFD
    ids = ids_of(mistral, "▁a", "<0xE2>", "<0x82>", "b")
    check(
        text_of_ids(ids, mistral, True),
        "a\ufffd\ufffdb",
        [(0, 1), (1, 2), (2, 3), (3, 4)],
        replaced=2,
    )


def test_special_tokens_stand_for_no_text(mistral):
    bos, eos = mistral.bos_id, mistral.eos_id
    ids = [bos, *ids_of(mistral, "▁Hi", "▁there"), eos, bos, *ids_of(mistral, "▁x")]
    # the dummy prefix goes with the first token that stands for text, after the BOS
    check(
        text_of_ids(ids, mistral, True),
        "Hi there x",
        [(0, 0), (0, 2), (2, 8), (8, 8), (8, 8), (8, 10)],
    )


def test_byte_level_tokens_split_inside_a_character(smol):
    # " 😀x" as SmolLM2 cuts it: "ĠðŁĺ" ends inside the emoji, "Ģ" finishes it
    ids = ids_of(smol, "ĠðŁĺ", "Ģ", "x")
    check(text_of_ids(ids, smol, False), " 😀x", [(0, 2), (1, 2), (2, 3)])
    # a byte-level tokenizer has no dummy prefix: a leading space is text
    check(text_of_ids(ids_of(smol, "Ġworld"), smol, False), " world", [(0, 6)])


CORPUS = [
    *list(pydoc_data.topics.topics.values())[:40],
    "a€b 😀x",
    "ünï ☃ 中文字 𝔘𝔫𝔦 🦜🦜 ǅ",
    "\nfoo",
    "x  y\t z\n\n\n  ",
    "ﬁne Ⅻ ｆｕｌｌ",
    "def f(a, b):\n    return a + b  # ok\n",
]


@pytest.mark.parametrize("which", ["mistral", "smol"])
def test_canonical_ids_give_the_tokenizers_own_text_and_offsets(which, request):
    """For ids the tokenizer itself made, the text and offsets are exactly its own (texts that
    do not start with whitespace: SentencePiece's dummy prefix swallows a leading space)."""
    tok, view = request.getfixturevalue(f"{which}_tok"), request.getfixturevalue(which)
    prefix = adds_prefix_space(tok, view)
    for text in CORPUS:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        result = text_of_ids(enc["input_ids"], view, prefix)
        assert result.text == text
        expected = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        np.testing.assert_array_equal(result.offsets, expected, err_msg=text[:40])
        assert result.replaced == 0


@pytest.mark.slow  # builds a 32k -> 49k vocabulary map
@pytest.mark.parametrize(("target", "teacher"), [("smol", "mistral")])
def test_canonical_ids_fuse_bit_identically_to_the_text_path(target, teacher, request):
    """The text path's block (text, the tokenizer's offsets) and the ids path's (rebuilt text and
    offsets) are the same arrays, with a teacher of the other tokenizer family (synthetic top-k
    on its real tokenization, as in test_pipeline). SmolLM2's byte-level BPE as the target here;
    Mistral v1 as the target is checked through the service (test_ids_input)."""
    from fuseserve.aligner.options import FusionOptions
    from fuseserve.aligner.pipeline import TeacherInput, fuse_block
    from fuseserve.aligner.vocabmap import build_vocab_map
    from tests.aligner.test_pipeline import fake_scores

    t_tok, t_view = request.getfixturevalue(f"{target}_tok"), request.getfixturevalue(target)
    s_tok, s_view = request.getfixturevalue(f"{teacher}_tok"), request.getfixturevalue(teacher)
    vmap = build_vocab_map(s_view, t_view)
    prefix = adds_prefix_space(t_tok, t_view)
    text = "def f(😀, x):\n    return 'ünï' + x  # ☃ 中文\n" + CORPUS[3][:600]
    enc = t_tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    scores = fake_scores(s_tok, text, s_view.vocab_size, 5, seed=7)
    recovered = text_of_ids(ids, t_view, prefix)
    assert recovered.text == text
    for options in (FusionOptions(), FusionOptions(alignment="dtw")):
        teachers = [TeacherInput(teacher, s_view, vmap, scores)]
        by_text = fuse_block(text, t_view, ids, enc["offset_mapping"], teachers, options)
        by_ids = fuse_block(recovered.text, t_view, ids, recovered.offsets, teachers, options)
        for name in ("target_ids", "ids", "probs", "tail", "chosen", "ce", "coverage"):
            np.testing.assert_array_equal(getattr(by_text, name), getattr(by_ids, name))
