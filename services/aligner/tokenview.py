"""A tokenizer-independent view of a vocabulary: raw token strings, canonical surfaces, specials.

Covers: detecting the vocabulary scheme (byte-level BPE with ``Ġ``/``Ċ``, SentencePiece with ``▁``
and ``<0xNN>`` byte fallback, WordPiece with ``##``; tiktoken-style byte vocabularies are converted
to byte-level strings), the canonical *surface* of each token (the text it stands for, as a ``str``
in which bytes that are not valid UTF-8 on their own are kept as surrogate escapes, so byte
pieces of one character compare equal across tokenizers), special tokens, and a stable fingerprint.
Also turns a tokenizer's character offsets into byte-precise context ends.

Leaves out: loading tokenizers from disk or a hub (callers pass a loaded object, duck-typed), and
everything about models. No I/O, no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import numpy as np

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


def bytes_to_surface(data: bytes) -> str:
    """Decode bytes as UTF-8, keeping stray bytes as surrogate escapes (lossless, comparable)."""
    return data.decode("utf-8", "surrogateescape")


def surface_to_bytes(surface: str) -> bytes:
    return surface.encode("utf-8", "surrogateescape")


def byte_level_string(data: bytes) -> str:
    """Write raw bytes as a byte-level BPE token string (e.g. b' the' -> 'Ġthe')."""
    return "".join(BYTE_TO_CHAR[b] for b in data)


def _sentencepiece_byte(token: str) -> int | None:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def token_surface(token: str, scheme: Scheme, special: bool) -> str:
    """The text a single token stands for.

    Special tokens keep their literal string (they stand for no text; callers exclude them).
    WordPiece word-initial pieces get a leading space, like ``▁``/``Ġ`` pieces, so that word
    starts compare alike across schemes; ``##`` continuations get none.
    """
    if special:
        return token
    if scheme is Scheme.BYTE_LEVEL:
        if all(c in CHAR_TO_BYTE for c in token):
            return bytes_to_surface(bytes(CHAR_TO_BYTE[c] for c in token))
        return token  # an added token written as plain text
    if scheme is Scheme.SENTENCEPIECE:
        byte = _sentencepiece_byte(token)
        if byte is not None:
            return bytes_to_surface(bytes([byte]))
        return token.replace(SENTENCEPIECE_MARKER, " ")
    if token.startswith(WORDPIECE_PREFIX) and len(token) > len(WORDPIECE_PREFIX):
        return token[len(WORDPIECE_PREFIX) :]
    return " " + token


def marker_of(scheme: Scheme) -> str:
    """The word-boundary marker the original FuseLLM code swaps between vocabularies."""
    return {
        Scheme.BYTE_LEVEL: BYTE_LEVEL_MARKER,
        Scheme.SENTENCEPIECE: SENTENCEPIECE_MARKER,
        Scheme.WORDPIECE: "",
    }[scheme]


def strip_marker(token: str, scheme: Scheme) -> str:
    """Token string with its word-boundary markers removed (the original DTW cell strings)."""
    marker = marker_of(scheme)
    return token.replace(marker, "") if marker else token


@dataclass(frozen=True)
class TokenizerView:
    """Everything the aligner needs to know about one vocabulary.

    ``tokens[i]`` is the raw string of id ``i``; ``surfaces[i]`` its canonical text.
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
    def surfaces(self) -> tuple[str, ...]:
        return tuple(
            token_surface(tok, self.scheme, i in self.special_ids)
            for i, tok in enumerate(self.tokens)
        )

    @cached_property
    def is_special(self) -> np.ndarray:
        """[vocab] bool."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        if self.special_ids:
            mask[np.fromiter(self.special_ids, dtype=np.int64)] = True
        return mask

    @cached_property
    def is_byte_piece(self) -> np.ndarray:
        """[vocab] bool: SentencePiece ``<0xNN>`` fallback tokens."""
        if self.scheme is not Scheme.SENTENCEPIECE:
            return np.zeros(self.vocab_size, dtype=bool)
        return np.array([_sentencepiece_byte(t) is not None for t in self.tokens], dtype=bool)

    @cached_property
    def surface_nbytes(self) -> np.ndarray:
        """[vocab] int64: UTF-8 length of each surface (0 for specials)."""
        out = np.array([len(surface_to_bytes(s)) for s in self.surfaces], dtype=np.int64)
        out[self.is_special] = 0
        return out

    @cached_property
    def surface_bytes(self) -> tuple[bytes, ...]:
        """UTF-8 bytes of each surface (empty for specials)."""
        return tuple(
            b"" if self.is_special[i] else surface_to_bytes(s) for i, s in enumerate(self.surfaces)
        )

    @cached_property
    def surface_byte_matrix(self) -> np.ndarray:
        """[vocab, longest surface] uint8: each surface's bytes, zero-padded (with
        ``surface_nbytes`` for the lengths), for vectorised prefix tests."""
        width = max((len(b) for b in self.surface_bytes), default=0)
        out = np.zeros((self.vocab_size, max(width, 1)), dtype=np.uint8)
        for i, b in enumerate(self.surface_bytes):
            out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        return out

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

    @cached_property
    def stripped(self) -> tuple[str, ...]:
        """Token strings without word-boundary markers (the paper's DTW strings)."""
        return tuple(strip_marker(t, self.scheme) for t in self.tokens)

    @cached_property
    def compact_surfaces(self) -> tuple[str, ...]:
        """Surfaces without spaces: fuseserve's DTW strings (markers resolved, then dropped)."""
        return tuple(s.replace(" ", "") for s in self.surfaces)

    @cached_property
    def id_of(self) -> dict[str, int]:
        """Raw token string -> lowest id carrying it."""
        out: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            out.setdefault(tok, i)
        return out

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf(cls, tokenizer: object, name: str | None = None) -> TokenizerView:
        """Build from a loaded Hugging Face tokenizer (fast or slow), duck-typed."""
        size = len(tokenizer)  # type: ignore[arg-type]
        tokens = list(tokenizer.convert_ids_to_tokens(list(range(size))))  # type: ignore[attr-defined]
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
    ) -> TokenizerView:
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


# ---------------------------------------------------------------------- offsets
def char_to_byte_offsets(text: str) -> np.ndarray:
    """[len(text)+1] int64: UTF-8 byte offset of each character boundary."""
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    widths = (
        1
        + (codepoints >= 0x80).astype(np.int64)
        + (codepoints >= 0x800).astype(np.int64)
        + (codepoints >= 0x10000).astype(np.int64)
    )
    out = np.zeros(len(codepoints) + 1, dtype=np.int64)
    np.cumsum(widths, out=out[1:])
    return out


def context_ends(
    token_ids: np.ndarray, char_offsets: np.ndarray, text: str, view: TokenizerView
) -> np.ndarray:
    """Byte offset at which each position's context ends.

    token_ids: [n] ints; char_offsets: [n, 2] (start, end) character offsets as a tokenizer's
    ``offset_mapping`` gives them. Returns [n] int64: the UTF-8 byte length of the text read up to
    and including token ``i``. Tokens that share a character end (byte pieces of one character)
    get byte-precise ends from their surface lengths. Special tokens read no text: a special at
    position 0 gets 0 (the empty context); any other special gets ``-1 - i`` so that it pairs
    with nothing.
    """
    token_ids = np.asarray(token_ids, dtype=np.int64)
    n = len(token_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.asarray(char_offsets, dtype=np.int64).reshape(n, 2)
    c2b = char_to_byte_offsets(text)
    char_end = np.clip(offsets[:, 1], 0, len(text))
    ends = c2b[char_end].copy()
    special = view.is_special[token_ids]
    # Byte pieces of one character share a char end: the last keeps it, earlier ones end
    # before the later pieces' bytes.
    nbytes = view.surface_nbytes[token_ids]
    shared = np.nonzero(
        (char_end[:-1] == char_end[1:])
        & ~special[:-1]
        & ~special[1:]
        & (offsets[1:, 0] < offsets[1:, 1])
    )[0]
    for i in shared[::-1]:  # rare: only byte pieces of one character
        ends[i] = ends[i + 1] - nbytes[i + 1]
    positions = np.arange(n, dtype=np.int64)
    ends[special] = -1 - positions[special]
    if special[0]:
        ends[0] = 0
    return ends
