"""Domain corpora from text that every machine with Python has, split into disjoint parts.

Covers three domains found on a fresh install: ``code`` (the standard library's Python sources),
``prose`` (the language reference as English prose, ``pydoc_data.topics``) and ``c`` (the C
headers of the Python install, ``sysconfig``'s include directory). Documents are cut into pieces
of about ``piece_chars`` at line breaks, shuffled with a fixed seed, and dealt to the splits in a
fixed order (test, valid, fusion, expert, pretrain). ``split_by: document`` (the default) deals
whole documents, so no module, header or topic is in two splits; ``piece`` deals the pieces
themselves (pieces of one document can land in several splits: the older files' setting). Each
split is written as one ``.jsonl`` file per domain (``{"text": ...}`` per line) under the corpus
folder.

Out-of-distribution held-out text (``ood``): prose, Python and C from other projects, present on
any Debian machine with Python and fuseserve's dependencies: the licence texts of
``/usr/share/common-licenses``, pip's sources inside the wheel that ``ensurepip`` bundles, and
NumPy's C headers. None of the corpus's models is trained on them.

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


def ood_prose_documents() -> list[str]:
    """English prose from outside Python: the licence texts every Debian system carries
    (``/usr/share/common-licenses``, package base-files), each file once."""
    folder = Path("/usr/share/common-licenses")
    files = {p.resolve() for p in folder.glob("*") if p.is_file()} if folder.is_dir() else set()
    return [t for p in sorted(files) if (t := _read(p)).strip()]


def ood_code_documents() -> list[str]:
    """Python from another project: pip's sources, from the wheel that ``ensurepip`` bundles
    with every CPython install (read from the zip; nothing is installed)."""
    import ensurepip
    import zipfile

    wheels = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    docs = []
    for wheel in wheels[-1:]:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if n.endswith(".py"))
            docs += [z.read(n).decode("utf-8", "replace") for n in names]
    return [d for d in docs if d.strip()]


def ood_c_documents() -> list[str]:
    """C from another project: NumPy's C API headers (numpy is a fuseserve dependency)."""
    import numpy

    files = sorted(Path(numpy.get_include()).rglob("*.h"))
    return [t for p in files if (t := _read(p)).strip()]


# held-out text from outside the corpus's sources, by kind (domain ``ood-<kind>``)
OOD_DOMAINS: dict[str, Callable[[], list[str]]] = {
    "prose": ood_prose_documents,
    "code": ood_code_documents,
    "c": ood_c_documents,
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
    """The written corpus: ``root/<split>/<domain>.jsonl`` and its content fingerprint (of the
    in-distribution splits); ``root/ood/ood-<kind>.jsonl`` and their own fingerprint."""

    root: Path
    domains: tuple[str, ...]
    fingerprint: str
    ood_domains: tuple[str, ...] = ()
    ood_fingerprint: str = ""

    def files(self, split: str, domain: str | None = None) -> list[Path]:
        """The files of a split (one domain, or all its domains; split ``ood``: OOD texts)."""
        domains = [domain] if domain else self.domains_of(split)
        return [self.root / split / f"{d}.jsonl" for d in domains]

    def domains_of(self, split: str) -> tuple[str, ...]:
        return self.ood_domains if split == "ood" else self.domains

    def texts(self, split: str, domain: str) -> list[str]:
        path = self.files(split, domain)[0]
        return [json.loads(line)["text"] for line in path.read_text().splitlines() if line]

    def heldout(self, split: str = "test") -> dict[str, list[str]]:
        return {d: self.texts(split, d) for d in self.domains_of(split)}


def deal_documents(
    documents: list[list[str]], sizes: dict[str, int], seed: int = 0, min_documents: int = 5
) -> dict[str, list[str]]:
    """Deal whole documents (each a list of pieces) to splits in ``DEAL_ORDER``: a document's
    pieces all go to one split, so no split shares a module, header or topic with another.

    Documents are shuffled; a split takes documents until it has its characters (pieces in a
    shuffled order). The held-out splits (test, valid) take at most ``ceil(chars /
    min_documents)`` from any one document, so they spread over at least ``min_documents``
    documents even where documents are large; the training splits take whole documents. The rest
    of a document a split took part of is left unused. Raises ValueError naming the split that
    runs dry."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(documents))
    out: dict[str, list[str]] = {s: [] for s in sizes}
    i = 0
    for split in DEAL_ORDER:
        want = sizes.get(split, 0)
        cap = -(-want // min_documents) if split in ("test", "valid") else want
        while want > 0:
            if i >= len(order):
                have = sum(len(p) for doc in documents for p in doc)
                raise ValueError(
                    f"{split}_chars: the domain has {have} characters in {len(documents)} "
                    f"documents, too few for the splits asked when whole documents go to one "
                    f"split ({sizes})"
                )
            doc = documents[order[i]]
            i += 1
            take = min(want, cap)
            for j in rng.permutation(len(doc)):
                if take <= 0:
                    break
                piece = doc[j][:take]
                out[split].append(piece)
                take -= len(piece)
                want -= len(piece)
    return out


def deal_corpus(cfg: CorpusConfig, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """domain -> split -> texts, without writing anything. Raises ValueError naming the field
    (``corpus.<split>_chars``) and the domain when a domain has too little text."""
    out = {}
    sizes = {s: cfg.chars(s) for s in SPLITS}
    for domain in cfg.domains:
        docs = [cut_pieces(doc, cfg.piece_chars) for doc in DOMAINS[domain]()]
        try:
            if cfg.split_by == "piece":
                out[domain] = deal([p for doc in docs for p in doc], sizes, seed)
            else:
                out[domain] = deal_documents([d for d in docs if d], sizes, seed)
        except ValueError as exc:
            raise ValueError(f"corpus.{exc} [domain {domain}]") from None
    return out


def deal_ood(cfg: CorpusConfig, seed: int = 0) -> dict[str, list[str]]:
    """``ood-<kind>`` -> held-out texts from outside the corpus (``OOD_DOMAINS``)."""
    out = {}
    for kind in cfg.ood:
        docs = [cut_pieces(doc, cfg.piece_chars) for doc in OOD_DOMAINS[kind]()]
        try:
            out[f"ood-{kind}"] = deal_documents(
                [d for d in docs if d], {"test": cfg.ood_chars}, seed
            )["test"]
        except ValueError as exc:
            raise ValueError(f"corpus.ood_chars: ood {kind}: {exc}") from None
    return out


def build_corpus(cfg: CorpusConfig, root: Path, seed: int = 0) -> Corpus:
    """Write every split of every domain under ``root`` (rewritten each time: it takes seconds),
    and the out-of-distribution texts under ``root/ood``."""
    h = hashlib.sha256()
    for domain, splits in deal_corpus(cfg, seed).items():
        for split, texts in splits.items():
            h.update(
                f"{split}/{domain}\n{_write(root / split / f'{domain}.jsonl', texts)}".encode(
                    "utf-8", "surrogatepass"
                )
            )
    ood = hashlib.sha256()
    for name, texts in deal_ood(cfg, seed).items():
        ood.update(
            f"{name}\n{_write(root / 'ood' / f'{name}.jsonl', texts)}".encode(
                "utf-8", "surrogatepass"
            )
        )
    ood_domains = tuple(f"ood-{k}" for k in cfg.ood)
    return Corpus(root, tuple(cfg.domains), h.hexdigest()[:16], ood_domains, ood.hexdigest()[:16])


def _write(path: Path, texts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    path.write_text(lines)
    return lines
