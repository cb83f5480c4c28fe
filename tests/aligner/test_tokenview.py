"""Tokenizer views on the real shipped tokenizers, with hand-checked surfaces and byte ends."""

import numpy as np
import pytest

from fuseserve import shipped
from fuseserve.aligner.tokenview import (
    Scheme,
    TokenizerView,
    byte_level_string,
    char_to_byte_offsets,
    context_ends,
    token_surface,
)
from tests.conftest import encode


def test_schemes_are_detected(mistral, smol, bert):
    assert mistral.scheme is Scheme.SENTENCEPIECE
    assert smol.scheme is Scheme.BYTE_LEVEL
    assert bert.scheme is Scheme.WORDPIECE
    assert (mistral.vocab_size, smol.vocab_size, bert.vocab_size) == (32000, 49152, 30522)


@pytest.mark.parametrize(
    ("view", "token", "surface"),
    [
        ("mistral", "▁world", " world"),
        ("mistral", "<0x0A>", "\n"),
        ("mistral", "<0xEA>", "\udcea"),
        ("mistral", "▁▁", "  "),
        ("smol", "Ġworld", " world"),
        ("smol", "Ċ", "\n"),
        ("smol", "ĠcafÃ©", " café"),
        ("smol", "Ġê", " \udcea"),
        ("bert", "##ing", "ing"),
        ("bert", "hello", " hello"),
    ],
)
def test_surfaces(view, token, surface, request):
    v = request.getfixturevalue(view)
    assert v.surfaces[v.id_of[token]] == surface


def test_specials(mistral, smol, bert):
    assert mistral.bos_id == 1 and mistral.eos_id == 2 and mistral.unk_id == 0
    assert {0, 1, 2} <= mistral.special_ids
    assert smol.is_special[smol.eos_id]
    assert bert.is_special[bert.id_of["[CLS]"]] and bert.is_special[bert.id_of["[SEP]"]]
    # a special keeps its literal; it stands for no text in context ends
    assert token_surface("<s>", Scheme.SENTENCEPIECE, special=True) == "<s>"


def test_byte_pieces_of_one_character_agree_across_tokenizers(mistral, smol):
    # 'ꙮ' is three UTF-8 bytes: Mistral spells it <0xEA><0x99><0xAE>, SmolLM2 'Ġê','Ļ','®'.
    m = "".join(mistral.surfaces[mistral.id_of[t]] for t in ["<0xEA>", "<0x99>", "<0xAE>"])
    s = "".join(smol.surfaces[smol.id_of[t]] for t in ["Ġê", "Ļ", "®"])
    assert s == " " + m
    assert m.encode("utf-8", "surrogateescape").decode("utf-8") == "ꙮ"


def test_fingerprint_is_stable_and_distinguishes(mistral, smol, mistral_tok):
    again = TokenizerView.from_hf(mistral_tok, "another name")
    assert again.fingerprint == mistral.fingerprint  # the name is not part of it
    assert mistral.fingerprint != smol.fingerprint
    changed = TokenizerView(
        name="x",
        scheme=mistral.scheme,
        tokens=(*mistral.tokens[:-1], "▁zzz"),
        special_ids=mistral.special_ids,
        bos_id=1,
        eos_id=2,
    )
    assert changed.fingerprint != mistral.fingerprint


def test_tiktoken_style_vocabulary():
    tokens, n_special = shipped.tekken_byte_tokens(limit=5000)
    view = TokenizerView.from_byte_tokens(
        [b"" for _ in range(n_special)] + tokens,
        name="tekken",
        specials=[(i, f"<SPECIAL_{i}>") for i in range(n_special)],
        bos_id=1,
        eos_id=2,
    )
    assert view.scheme is Scheme.BYTE_LEVEL
    for i, raw in enumerate(tokens[:2000]):
        assert view.surfaces[n_special + i].encode("utf-8", "surrogateescape") == raw
    assert byte_level_string(b" the") == "Ġthe"


def test_char_to_byte_offsets():
    np.testing.assert_array_equal(char_to_byte_offsets("aé😀b"), [0, 1, 3, 7, 8])


def test_context_ends_hand_worked(mistral_tok, smol_tok, mistral, smol):
    text = "x ꙮ y"  # bytes: x(1) ' '(1) ꙮ(3) ' '(1) y(1)
    ids, off = encode(mistral_tok, text)
    assert mistral_tok.convert_ids_to_tokens(ids.tolist()) == [
        "▁x",
        "▁",
        "<0xEA>",
        "<0x99>",
        "<0xAE>",
        "▁y",
    ]
    assert context_ends(ids, off, text, mistral).tolist() == [1, 2, 3, 4, 5, 7]
    ids, off = encode(smol_tok, text)
    assert smol_tok.convert_ids_to_tokens(ids.tolist()) == ["x", "Ġê", "Ļ", "®", "Ġy"]
    assert context_ends(ids, off, text, smol).tolist() == [1, 3, 4, 5, 7]
    ids, off = encode(mistral_tok, text, bos=True)
    assert context_ends(ids, off, text, mistral).tolist() == [0, 1, 2, 3, 4, 5, 7]
