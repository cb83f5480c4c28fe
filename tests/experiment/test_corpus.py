"""Domain corpora: disjoint splits of the asked sizes, the same every time."""

from __future__ import annotations

import json

import pytest

from fuseserve.experiment.config import CorpusConfig
from fuseserve.experiment.corpus import DOMAINS, build_corpus, cut_pieces, deal


def test_every_domain_is_on_a_fresh_python_install():
    for name, documents in DOMAINS.items():
        docs = documents()
        assert sum(len(d) for d in docs) > 300_000, name


def test_pieces_cut_at_line_breaks():
    text = "".join(f"line {i}\n" for i in range(100))
    pieces = cut_pieces(text, 50)
    assert "".join(pieces) == text
    assert all(len(p) <= 50 for p in pieces)


def test_splits_are_disjoint_sized_and_reproducible(tmp_path):
    cfg = CorpusConfig(
        domains=("code", "prose", "c"),
        pretrain_chars=20_000,
        expert_chars=10_000,
        fusion_chars=5_000,
        valid_chars=2_000,
        test_chars=3_000,
        piece_chars=1_000,
    )
    a = build_corpus(cfg, tmp_path / "a")
    b = build_corpus(cfg, tmp_path / "b")
    assert a.fingerprint == b.fingerprint
    for domain in cfg.domains:
        seen: set[str] = set()
        for split in ("pretrain", "expert", "fusion", "valid", "test"):
            texts = a.texts(split, domain)
            assert sum(len(t) for t in texts) == cfg.chars(split)
            assert not seen & set(texts), (domain, split)
            seen |= set(texts)
        lines = (tmp_path / "a" / "test" / f"{domain}.jsonl").read_text().splitlines()
        assert all("text" in json.loads(line) for line in lines)


def test_a_domain_too_small_names_the_split():
    with pytest.raises(ValueError, match="pretrain_chars"):
        deal(["x" * 100] * 5, {"test": 200, "pretrain": 1_000})
