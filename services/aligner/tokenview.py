"""A tokenizer-independent view of a vocabulary: raw token strings, canonical surfaces, specials.

Covers, on top of a tokenizer's identity (``fuseserve.wire.tokenizer``: token strings, scheme,
specials, fingerprint): SentencePiece ``<0xNN>`` byte-fallback pieces, the canonical *surface* of
each token (the text it stands for, as a ``str`` in which bytes that are not valid UTF-8 on their
own are kept as surrogate escapes, so byte pieces of one character compare equal across
tokenizers), and the marker-stripped strings of the original DTW. Also turns a tokenizer's
character offsets into byte-precise context ends.

Leaves out: loading tokenizers from disk or a hub (callers pass a loaded object, duck-typed), and
everything about models. No I/O, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fuseserve.wire.tokenizer import (
    BYTE_LEVEL_MARKER,
    CHAR_TO_BYTE,
    SENTENCEPIECE_MARKER,
    WORDPIECE_PREFIX,
    TokenizerIdentity,
)
from fuseserve.wire.tokenizer import Scheme as Scheme  # re-exported
from fuseserve.wire.tokenizer import byte_level_string as byte_level_string  # re-exported
from fuseserve.wire.tokenizer import detect_scheme as detect_scheme  # re-exported


def bytes_to_surface(data: bytes) -> str:
    """Decode bytes as UTF-8, keeping stray bytes as surrogate escapes (lossless, comparable)."""
    return data.decode("utf-8", "surrogateescape")


def surface_to_bytes(surface: str) -> bytes:
    return surface.encode("utf-8", "surrogateescape")


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
class TokenizerView(TokenizerIdentity):
    """Everything the aligner needs to know about one vocabulary: its identity (token strings,
    specials, fingerprint) plus what each token stands for as text.

    ``tokens[i]`` is the raw string of id ``i``; ``surfaces[i]`` its canonical text.
    """

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
