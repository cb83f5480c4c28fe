"""Target token ids -> the text they stand for and each token's character offsets.

Pre-tokenized input (a student's sampled sequence, say) reaches the aligner as target ids, not
text. The ids need not be what the tokenizer would make of their text (sampled sequences often are
not), so the text is rebuilt from the ids and never re-tokenised: the block's target ids are
exactly the ids given.

Rules (``text_of_ids``), each a convention of Hugging Face tokenizers that it reproduces, so that
for the canonical ids of a text the text and offsets are the tokenizer's own:

- A token stands for its surface (``TokenizerView.surfaces``: ``▁``/``Ġ`` as spaces,
  ``<0xNN>`` byte-fallback pieces and byte-level pieces as their bytes).
- SentencePiece's *dummy prefix*: a tokenizer that writes ``"a"`` as ``"▁a"`` (``prefix_space``)
  added that space itself, so the first token that stands for text loses one leading space. A
  token that is nothing but that space (``"▁"`` before a byte piece) covers the first character,
  as the tokenizer's offset mapping has it.
- Special tokens (BOS, EOS, ...) stand for no text: an empty span where they sit.
- A token covers the characters its bytes touch: from the character holding its first byte to the
  one holding its last (byte pieces of one character each cover that whole character).
- Bytes that are not valid UTF-8 (a sampled byte piece without the rest of its character) become
  one U+FFFD each; ``replaced`` counts them. The text, offsets and teachers then see U+FFFD.

Leaves out: checking ids against the vocabulary (callers name the bad field first), tokenising
text, and everything about teachers. Pure: numpy only, no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuseserve.aligner.tokenview import TokenizerView

REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class IdsText:
    """``text``: what the ids stand for; ``offsets``: [n, 2] int64 (start, end) characters of each
    id in ``text``; ``replaced``: bytes that were not valid UTF-8, each now one U+FFFD."""

    text: str
    offsets: np.ndarray
    replaced: int


def adds_prefix_space(tokenizer: Any, view: TokenizerView) -> bool:
    """Whether ``tokenizer`` (a loaded Hugging Face tokenizer, duck-typed) writes a text that
    starts with a letter with a leading space, as SentencePiece's dummy prefix does."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    text_ids = [i for i in ids if not view.is_special[i]]
    return bool(text_ids) and view.surfaces[text_ids[0]].startswith(" ")


def _char_widths(decoded: str) -> np.ndarray:
    """[len(decoded)] int64: UTF-8 bytes behind each character of a surrogate-escaped string
    (an escaped stray byte, U+DC80..U+DCFF, stands for one byte)."""
    codepoints = np.frombuffer(decoded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    escaped = (codepoints >= 0xDC80) & (codepoints <= 0xDCFF)
    widths = (
        1
        + (codepoints >= 0x80).astype(np.int64)
        + (codepoints >= 0x800).astype(np.int64)
        + (codepoints >= 0x10000).astype(np.int64)
    )
    return np.where(escaped, 1, widths)


def _pieces(ids: np.ndarray, view: TokenizerView, prefix_space: bool) -> tuple[list[bytes], int]:
    """Each id's bytes, and the position whose dummy-prefix space was dropped (-1: none)."""
    pieces = [view.surface_bytes[i] for i in ids.tolist()]
    dummy = -1
    if prefix_space:
        first = next((p for p, piece in enumerate(pieces) if piece), -1)
        if first >= 0 and pieces[first].startswith(b" "):
            pieces[first] = pieces[first][1:]
            dummy = first
    return pieces, dummy


def text_of_ids(
    ids: Sequence[int] | np.ndarray, view: TokenizerView, prefix_space: bool
) -> IdsText:
    """The text ``ids`` ([n] ints, each in ``[0, view.vocab_size)``) stand for, and their
    character offsets ([n, 2]), by the rules of the module docstring."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    pieces, dummy = _pieces(ids, view, prefix_space)
    data = b"".join(pieces)
    decoded = data.decode("utf-8", "surrogateescape")
    widths = _char_widths(decoded)
    char_start = np.zeros(len(widths) + 1, dtype=np.int64)  # byte offset of each character
    np.cumsum(widths, out=char_start[1:])
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    b_end = np.cumsum(lengths)
    b_start = b_end - lengths
    # the character holding the first byte, and one past the character holding the last
    start = np.searchsorted(char_start, b_start, side="right") - 1
    end = np.searchsorted(char_start, b_end - 1, side="right")
    empty = lengths == 0
    end = np.where(empty, start, end)
    if dummy >= 0 and empty[dummy]:  # only the dummy space: the tokenizer maps it to char 0
        start[dummy], end[dummy] = 0, min(1, len(decoded))
    offsets = np.stack([start, end], axis=1).astype(np.int64)
    stray = int(np.count_nonzero((widths == 1) & _escaped(decoded)))
    text = _replace_escapes(decoded) if stray else decoded
    return IdsText(text, offsets, stray)


def _escaped(decoded: str) -> np.ndarray:
    codepoints = np.frombuffer(decoded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    out: np.ndarray = (codepoints >= 0xDC80) & (codepoints <= 0xDCFF)
    return out


def _replace_escapes(decoded: str) -> str:
    """Each surrogate escape (a stray byte) as one U+FFFD: the character count stays."""
    return "".join(REPLACEMENT if 0xDC80 <= ord(c) <= 0xDCFF else c for c in decoded)
