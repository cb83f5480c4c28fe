"""What services tell each other about themselves: a teacher's Info, the aligner's teacher status.

Covers ``TeacherInfo`` (a teacher's model, its tokenizer's identity without the token strings,
its limits; the cache fingerprint that makes two teachers' scores interchangeable; rebuilding the
tokenizer identity from it and the vocabulary) and ``TeacherStatus`` (what the aligner knows of
one of its teachers: addresses, readiness and why not, model, vocabulary, map quality). Both are
frozen plain values; transports only convert them (``fuseserve.wire.convert``).

Leaves out: protobuf and JSON encodings, and how the values are gathered.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TypeVar, overload

from fuseserve.wire.tokenizer import Scheme, TokenizerIdentity

ROLES = ("bos_id", "eos_id", "unk_id", "pad_id")
Identity = TypeVar("Identity", bound=TokenizerIdentity)


@dataclass(frozen=True)
class TeacherInfo:
    """A teacher's answer to Info. Role ids (``bos_id`` ...) are None where the tokenizer has
    none."""

    # the model and where it runs
    model_id: str
    revision: str
    architecture: str
    dtype: str
    device: str
    backend: str
    # its tokenizer (the token strings come from Vocab)
    tokenizer_fingerprint: str
    tokenizer_scheme: str
    vocab_size: int
    # limits of a Score call
    max_sequence_length: int
    max_k: int
    max_batch_texts: int
    max_request_tokens: int
    # its tokenizer's special ids and roles
    special_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None

    @classmethod
    def describe(cls, identity: TokenizerIdentity, **model_and_limits) -> TeacherInfo:
        """Info for a model served with ``identity``; ``model_and_limits``: the other fields."""
        return cls(
            tokenizer_fingerprint=identity.fingerprint,
            vocab_size=identity.vocab_size,
            tokenizer_scheme=str(identity.scheme),
            special_ids=tuple(sorted(identity.special_ids)),
            **{role: getattr(identity, role) for role in ROLES},
            **model_and_limits,
        )

    def cache_fingerprint(self) -> str:
        """What makes two teachers' scores interchangeable: model, revision, tokenizer, dtype."""
        parts = (self.model_id, self.revision, self.tokenizer_fingerprint, self.dtype, self.backend)
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]

    @overload
    def tokenizer(self, name: str, tokens: list[str]) -> TokenizerIdentity: ...

    @overload
    def tokenizer(self, name: str, tokens: list[str], kind: type[Identity]) -> Identity: ...

    def tokenizer(
        self, name: str, tokens: list[str], kind: type[TokenizerIdentity] = TokenizerIdentity
    ) -> TokenizerIdentity:
        """The teacher's tokenizer identity (as ``kind``, e.g. the aligner's view) from this
        Info and its vocabulary."""
        return kind(
            name=name,
            scheme=Scheme(self.tokenizer_scheme),
            tokens=tuple(tokens),
            special_ids=frozenset(self.special_ids),
            **{role: getattr(self, role) for role in ROLES},
        )


@dataclass(frozen=True)
class TeacherStatus:
    """One teacher as the aligner sees it. ``problem``: why it is not ready (None when it is);
    the model and vocabulary fields are None until its Info and vocabulary have been read."""

    name: str
    addresses: tuple[str, ...]
    ready: bool
    problem: str | None
    model_id: str | None
    backend: str | None
    tokenizer_fingerprint: str | None
    vocab_size: int | None
    max_k: int
    vocab_map_exact_fraction: float | None
