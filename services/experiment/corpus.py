"""Domain corpora from text that every machine with Python has, split into disjoint parts.

Covers three domains found on a fresh install: ``code`` (the standard library's Python sources),
``prose`` (the language reference as English prose, ``pydoc_data.topics``) and ``c`` (the C
headers of the Python install, ``sysconfig``'s include directory). Documents are cut into pieces
of about ``piece_chars`` at line breaks, shuffled with a fixed seed, and dealt to the splits in a
fixed order (test, valid, fusion, expert, pretrain), so no piece is in two splits. Each split is
written as one ``.jsonl`` file per domain (``{"text": ...}`` per line) under the corpus folder.

Leaves out: tokenising and packing (the trainer does that), models.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fuseserve.experiment.config import SPLITS, CorpusConfig

DEAL_ORDER = ("test", "valid", "fusion", "expert", "pretrain")


def code_documents() -> list[str]:
    """The standard library's top-level Python modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [t for p in sorted(stdlib.glob("*.py")) if (t := _read(p)).strip()]


def prose_documents() -> list[str]:
    """The Python language reference, one topic per document (English prose)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k] for k in sorted(topics) if topics[k].strip()]


def c_documents() -> list[str]:
    """C headers of the Python install (``/usr/include`` when the install has none)."""
    include = Path(sysconfig.get_paths()["include"])
    files = sorted(include.rglob("*.h")) or sorted(Path("/usr/include").glob("*.h"))
    return [t for p in files if (t := _read(p)).strip()]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


DOMAINS: dict[str, Callable[[], list[str]]] = {
    "code": code_documents,
    "prose": prose_documents,
    "c": c_documents,
}


def cut_pieces(text: str, piece_chars: int) -> list[str]:
    """Cut a document at line breaks into pieces of about ``piece_chars`` (a longer line stays
    whole)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size and size + len(line) > piece_chars:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def deal(pieces: list[str], sizes: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Shuffle pieces and deal them to splits in ``DEAL_ORDER`` until each has its characters
    (the last piece of a split is cut to fit). Raises ValueError naming the split that runs dry."""
    order = np.random.default_rng(seed).permutation(len(pieces))
    out: dict[str, list[str]] = {s: [] for s in sizes}
    i = 0
    for split in DEAL_ORDER:
        want = sizes.get(split, 0)
        while want > 0:
            if i >= len(order):
                have = sum(len(p) for p in pieces)
                raise ValueError(
                    f"{split}_chars: the domain has {have} characters in all, too few for "
                    f"the splits asked ({sizes})"
                )
            piece = pieces[order[i]][:want]
            i += 1
            out[split].append(piece)
            want -= len(piece)
    return out


@dataclass(frozen=True)
class Corpus:
    """The written corpus: ``root/<split>/<domain>.jsonl`` and its content fingerprint."""

    root: Path
    domains: tuple[str, ...]
    fingerprint: str

    def files(self, split: str, domain: str | None = None) -> list[Path]:
        """The files of a split (one domain, or all domains)."""
        domains = [domain] if domain else self.domains
        return [self.root / split / f"{d}.jsonl" for d in domains]

    def texts(self, split: str, domain: str) -> list[str]:
        path = self.files(split, domain)[0]
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]

    def heldout(self, split: str = "test") -> dict[str, list[str]]:
        return {d: self.texts(split, d) for d in self.domains}


def deal_corpus(cfg: CorpusConfig, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """domain -> split -> texts, without writing anything. Raises ValueError naming the field
    (``corpus.<split>_chars``) and the domain when a domain has too little text."""
    out = {}
    for domain in cfg.domains:
        pieces = [p for doc in DOMAINS[domain]() for p in cut_pieces(doc, cfg.piece_chars)]
        try:
            out[domain] = deal(pieces, {s: cfg.chars(s) for s in SPLITS}, seed)
        except ValueError as exc:
            raise ValueError(f"corpus.{exc} [domain {domain}]") from None
    return out


def build_corpus(cfg: CorpusConfig, root: Path, seed: int = 0) -> Corpus:
    """Write every split of every domain under ``root`` (rewritten each time: it takes seconds)."""
    h = hashlib.sha256()
    for domain, splits in deal_corpus(cfg, seed).items():
        for split, texts in splits.items():
            folder = root / split
            folder.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
            (folder / f"{domain}.jsonl").write_text(lines)
            h.update(f"{split}/{domain}\n{lines}".encode("utf-8", "surrogatepass"))
    return Corpus(root, tuple(cfg.domains), h.hexdigest()[:16])
