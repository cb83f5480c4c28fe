"""The tokenizers that ship inside PyPI packages: Tekken as a Hugging Face tokenizer."""

from __future__ import annotations

import pytest

from fuseserve import shipped
from fuseserve.aligner.tokenview import Scheme, TokenizerView

TEXT = "def foo(x):\n    return x + 12345  # café ünïcode 日本語\n\nThe quick brown fox."


@pytest.mark.slow
def test_full_tekken_matches_mistral_common():
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    reference = Tekkenizer.from_file(str(shipped.tekken_file()))
    ours = shipped.tekken_tokenizer(131072)
    expected = [i - reference.num_special_tokens for i in reference.encode(TEXT, False, False)]
    assert ours(TEXT, add_special_tokens=False)["input_ids"] == expected


def test_cut_tekken_is_a_lossless_byte_level_tokenizer():
    tok = shipped.tekken_tokenizer()
    assert len(tok) == 16384 + 3 and tok.bos_token_id == 16384
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert max(ids) < 16384 and tok.decode(ids) == TEXT
    view = TokenizerView.from_hf(tok, "tekken")
    assert view.scheme is Scheme.BYTE_LEVEL
    assert "".join(view.surfaces[i] for i in ids) == TEXT
