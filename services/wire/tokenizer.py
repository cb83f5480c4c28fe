"""Tokenizer identity: the vocabulary a tokenizer has, and a stable fingerprint of it.

Covers: the vocabulary scheme (byte-level BPE with ``Ġ``/``Ċ``, SentencePiece with ``▁``, WordPiece
with ``##``; tiktoken-style byte vocabularies are written as byte-level strings), reading a loaded
Hugging Face tokenizer (duck-typed) into a ``TokenizerIdentity`` (token strings, specials, the
bos/eos/unk/pad roles), and the fingerprint that teachers report in Info, the aligner checks and
keys its cache on, and the trainer compares with the aligner's target.

Leaves out: loading tokenizers from disk or a hub, and what tokens *mean* as text (surfaces,
alignment: ``fuseserve.aligner.tokenview``). No I/O, no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, Self

SENTENCEPIECE_MARKER = "▁"
BYTE_LEVEL_MARKER = "Ġ"
WORDPIECE_PREFIX = "##"


class Scheme(StrEnum):
    """How a vocabulary writes text into token strings."""

    BYTE_LEVEL = "byte_level"
    SENTENCEPIECE = "sentencepiece"
    WORDPIECE = "wordpiece"


def _byte_level_alphabet() -> dict[int, str]:
    """The GPT-2 reversible byte -> printable character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR: dict[int, str] = _byte_level_alphabet()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_CHAR.items()}


def byte_level_string(data: bytes) -> str:
    """Write raw bytes as a byte-level BPE token string (e.g. b' the' -> 'Ġthe')."""
    return "".join(BYTE_TO_CHAR[b] for b in data)


@dataclass(frozen=True)
class TokenizerIdentity:
    """Which vocabulary a tokenizer has: its token strings, how they write text, its specials.

    ``tokens[i]`` is the raw string of id ``i``. Two tokenizers with the same fingerprint
    tokenise alike as far as fuseserve can tell.
    """

    name: str
    scheme: Scheme
    tokens: tuple[str, ...]
    special_ids: frozenset[int] = field(default_factory=frozenset)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self) -> None:
        for label, value in (
            ("bos_id", self.bos_id),
            ("eos_id", self.eos_id),
            ("unk_id", self.unk_id),
            ("pad_id", self.pad_id),
        ):
            if value is not None and not 0 <= value < len(self.tokens):
                raise ValueError(f"{label}={value} is outside the vocabulary of {len(self.tokens)}")

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @cached_property
    def fingerprint(self) -> str:
        """A stable hash of the vocabulary and its specials (hex, 32 chars)."""
        payload = json.dumps(
            {
                "scheme": str(self.scheme),
                "tokens": self.tokens,
                "special": sorted(self.special_ids),
                "bos": self.bos_id,
                "eos": self.eos_id,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf(cls, tokenizer: Any, name: str | None = None) -> Self:
        """Build from a loaded Hugging Face tokenizer (fast or slow), duck-typed."""
        size = len(tokenizer)
        tokens = list(tokenizer.convert_ids_to_tokens(list(range(size))))
        tokens = [t if t is not None else f"<unused_{i}>" for i, t in enumerate(tokens)]
        specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials.update(i for i, tok in added.items() if getattr(tok, "special", False))
        specials = {i for i in specials if 0 <= i < size}
        scheme = detect_scheme(tokens, _backend_model_type(tokenizer))

        def special_id(attr: str) -> int | None:
            value = getattr(tokenizer, attr, None)
            return value if isinstance(value, int) and 0 <= value < size else None

        return cls(
            name=name or str(getattr(tokenizer, "name_or_path", "") or "tokenizer"),
            scheme=scheme,
            tokens=tuple(tokens),
            special_ids=frozenset(specials),
            bos_id=special_id("bos_token_id"),
            eos_id=special_id("eos_token_id"),
            unk_id=special_id("unk_token_id"),
            pad_id=special_id("pad_token_id"),
        )

    @classmethod
    def from_byte_tokens(
        cls,
        tokens: Sequence[bytes],
        name: str,
        specials: Iterable[tuple[int, str]] = (),
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> Self:
        """Build from a tiktoken-style vocabulary of raw bytes (e.g. a Tekken file).

        Byte tokens are written as byte-level strings; ``specials`` are (id, literal) pairs that
        replace whatever stands at those ids.
        """
        strings = [byte_level_string(t) for t in tokens]
        special_ids = set()
        for i, literal in specials:
            while len(strings) <= i:
                strings.append(f"<unused_{len(strings)}>")
            strings[i] = literal
            special_ids.add(i)
        return cls(
            name=name,
            scheme=Scheme.BYTE_LEVEL,
            tokens=tuple(strings),
            special_ids=frozenset(special_ids),
            bos_id=bos_id,
            eos_id=eos_id,
        )


def _backend_model_type(tokenizer: object) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # a backend that cannot serialise itself: fall back to the vocabulary
        return None
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer") or {}) + json.dumps(spec.get("decoder") or {})
    if model.get("type") == "WordPiece":
        return "wordpiece"
    if "ByteLevel" in pre:
        return "byte_level"
    if "Metaspace" in pre or model.get("byte_fallback"):
        return "sentencepiece"
    return None


def detect_scheme(tokens: Sequence[str], hint: str | None = None) -> Scheme:
    """Pick the scheme from the backend's own description, else from the vocabulary itself."""
    if hint is not None:
        return Scheme(hint)
    n = max(len(tokens), 1)
    wordpiece = sum(t.startswith(WORDPIECE_PREFIX) for t in tokens)
    spm = sum(SENTENCEPIECE_MARKER in t for t in tokens)
    bbpe = sum(BYTE_LEVEL_MARKER in t for t in tokens)
    if wordpiece / n > 0.05 and spm == 0 and bbpe == 0:
        return Scheme.WORDPIECE
    if spm > bbpe:
        return Scheme.SENTENCEPIECE
    return Scheme.BYTE_LEVEL
