"""First-token projection: which target token a teacher token's text would start with.

For every teacher token ``c`` and every byte offset ``o`` into its surface, the table holds the
target id that the *target tokenizer* emits first when the text ``surface(c)[o:]`` continues a
text at a target token boundary. Offset 0 serves a teacher candidate at a shared boundary (its
whole text); offset ``o > 0`` serves the remainder of a candidate after ``o`` bytes that the
target has already read (byte conditioning, see ``spans``).

How an entry is found, in order:

0. a remaining text of only spaces, of a whitespace-run token of a byte-level BPE teacher, is read
   as followed by a space and a word (its pre-tokenizer ends such runs one space early, see
   ``RUN_FOLLOWER``): the target tokenizer is asked about ``rest + " x"`` (SmolLM2's newline and
   three spaces before " return" are four spaces of indentation, which Mistral v1 reads as one
   four-space token); when the target merges that text with the newline it is asked about, the
   longest target token that is a prefix of the spaces alone is taken;
1. exact matches are pinned: at offset 0 the vocabulary map's exact match (EM), at any offset a
   target token whose surface is exactly the remaining text;
2. the target tokenizer itself, asked through ``first_tokens`` (a callable supplied by the caller,
   e.g. ``hf_first_tokens``: it tokenises each string after a newline so the string is read as a
   continuation, not as the start of a text);
3. the longest target token whose surface is a byte prefix of the remaining text (for text the
   tokenizer cannot be asked about: a remainder that starts inside a UTF-8 character, or one the
   tokenizer merges with the newline);
4. at offset 0 only, the vocabulary map's MinED choice (strings the target cannot start at all).

Entries are a ragged array: ``first[start[c] + o]`` for ``0 <= o < max(len(surface(c)), 1)``.
Serialisation uses the wire codec. No I/O, no tokenizer object inside (``first_tokens`` is called).

Leaves out: where tables are stored (``vocabmap_store``), how rows use them (``spans``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fuseserve.aligner.tokenview import Scheme, TokenizerView, surface_to_bytes
from fuseserve.aligner.vocabmap import StringMode, VocabMap, best_surface_ids
from fuseserve.wire import codec

CONTINUATION_SCHEMA = 2  # 2: runs of spaces of byte-level teachers are read with their follower
SENTINEL = "\n"
# Byte-level BPE pre-tokenizers (GPT-2's ``\s+(?!\S)``: SmolLM2, Tekken, Llama 3, ...) end a run of
# whitespace one space early when anything but whitespace follows, so the next token starts with
# the last space: "\n    return" is "\n   " + " return", "    1" is "   " + " " + "1". A teacher
# token that is a run (``_space_run``) is therefore read as followed by a space and a word, and
# the target tokenizer is asked about that text.
RUN_FOLLOWER = " x"

FirstTokens = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class ContinuationTable:
    """first: [entries] int32 target ids (-1 none); start: [teacher_vocab + 1] int64."""

    teacher_fingerprint: str
    target_fingerprint: str
    first: np.ndarray
    start: np.ndarray

    @property
    def teacher_vocab_size(self) -> int:
        return len(self.start) - 1

    @property
    def at_start(self) -> np.ndarray:
        """[teacher_vocab] int32: the entry at offset 0 of every teacher token."""
        entries: np.ndarray = self.first[self.start[:-1]]
        return entries

    def lookup(self, teacher_ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Target ids for teacher tokens at byte offsets (same shapes; offsets must be valid)."""
        ids: np.ndarray = self.first[self.start[teacher_ids] + offsets]
        return ids

    def to_bytes(self) -> bytes:
        return codec.encode(
            {"first": self.first.astype(np.int32), "start": self.start.astype(np.int64)},
            meta={
                "kind": "continuations",
                "schema": CONTINUATION_SCHEMA,
                "teacher": self.teacher_fingerprint,
                "target": self.target_fingerprint,
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ContinuationTable:
        arrays, meta = codec.decode(data)
        if meta.get("kind") != "continuations" or meta.get("schema") != CONTINUATION_SCHEMA:
            raise codec.CodecError("not a continuation table of this schema version")
        return cls(
            teacher_fingerprint=meta["teacher"],
            target_fingerprint=meta["target"],
            first=arrays["first"].astype(np.int32),
            start=arrays["start"].astype(np.int64),
        )


def hf_first_tokens(tokenizer: Any, batch_size: int = 4096) -> FirstTokens:
    """``first_tokens`` for a Hugging Face tokenizer (duck-typed): the id of the token that starts
    exactly where the string starts, when the string follows a newline; -1 when the tokenizer
    merges the string's start with the newline."""

    def first_tokens(strings: Sequence[str]) -> np.ndarray:
        out = np.full(len(strings), -1, dtype=np.int64)
        for a in range(0, len(strings), batch_size):
            chunk = [SENTINEL + s for s in strings[a : a + batch_size]]
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
                for token, (begin, _end) in zip(ids, offsets):
                    if begin >= len(SENTINEL):
                        if begin == len(SENTINEL):
                            out[a + i] = token
                        break
        return out

    return first_tokens


def _longest_prefix(data: bytes, by_bytes: dict[bytes, int], longest: int) -> int:
    for n in range(min(longest, len(data)), 0, -1):
        hit = by_bytes.get(data[:n])
        if hit is not None:
            return hit
    return -1


def _space_run(data: bytes) -> bool:
    """A whitespace-only token of at least two bytes that ends with a space: what a byte-level
    pre-tokenizer leaves before a token that starts with a space (a single space is also what it
    puts before a digit, "x = 1" being "x", " =", " ", "1", so it is not read this way)."""
    return len(data) >= 2 and data.strip() == b"" and data.endswith(b" ")


def build_continuation_table(
    teacher: TokenizerView,
    target: TokenizerView,
    vocab_map: VocabMap,
    first_tokens: FirstTokens | None = None,
) -> ContinuationTable:
    """The table for one (teacher, target) pair; ``vocab_map`` must be the ``surface`` map."""
    if vocab_map.mode is not StringMode.SURFACE:
        raise ValueError("vocab_map: the continuation table needs the `surface` map")
    if (vocab_map.teacher_fingerprint, vocab_map.target_fingerprint) != (
        teacher.fingerprint,
        target.fingerprint,
    ):
        raise ValueError("vocab_map: built for other tokenizers")
    by_bytes = {surface_to_bytes(s): i for s, i in best_surface_ids(target).items()}
    longest = max((len(b) for b in by_bytes), default=0)
    sizes = np.array([max(len(b), 1) for b in teacher.surface_bytes], dtype=np.int64)
    start = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=start[1:])
    first = np.full(int(start[-1]), -1, dtype=np.int64)
    questions = _fill_known(first, start, teacher, vocab_map, by_bytes, longest)
    if questions:
        ask_at, ask, fallback = zip(*questions)
        asked = first_tokens(list(ask)) if first_tokens is not None else np.full(len(ask), -1)
        for at, rest, hit in zip(ask_at, fallback, asked):
            exact = by_bytes.get(rest, -1)
            first[at] = (
                hit
                if hit >= 0
                else exact
                if exact >= 0
                else _longest_prefix(rest, by_bytes, longest)
            )
    at_start = first[start[:-1]]
    missing = (at_start < 0) & (vocab_map.target_ids >= 0)
    first[start[:-1][missing]] = vocab_map.target_ids[missing]  # MinED for what nothing starts
    return ContinuationTable(teacher.fingerprint, target.fingerprint, first.astype(np.int32), start)


def _fill_known(
    first: np.ndarray,
    start: np.ndarray,
    teacher: TokenizerView,
    vocab_map: VocabMap,
    by_bytes: dict[bytes, int],
    longest: int,
) -> list[tuple[int, str, bytes]]:
    """Fill the entries found without the target tokenizer (steps 1 and 3 of the module
    docstring); return the questions for it: (entry, text to ask about, the bytes to fall back on
    when it cannot say)."""
    questions: list[tuple[int, str, bytes]] = []
    byte_level = teacher.scheme is Scheme.BYTE_LEVEL
    for c, data in enumerate(teacher.surface_bytes):
        base = int(start[c])
        run = byte_level and _space_run(data)
        if vocab_map.exact[c] and not run:
            first[base] = vocab_map.target_ids[c]
        for o in range(len(data)):
            if first[base + o] >= 0:
                continue
            rest = data[o:]
            if run and rest.strip(b" ") == b"":
                questions.append((base + o, rest.decode() + RUN_FOLLOWER, rest))
                continue
            hit = by_bytes.get(rest)
            if hit is not None:
                first[base + o] = hit
                continue
            try:
                questions.append((base + o, rest.decode("utf-8"), rest))
            except UnicodeDecodeError:
                first[base + o] = _longest_prefix(rest, by_bytes, longest)
    return questions
