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


def test_document_split_keeps_every_document_in_one_split():
    from fuseserve.experiment.corpus import deal_documents

    # 40 documents of 10 pieces; each piece names its document
    docs = [[f"doc{d:02d} piece{p} " * 10 for p in range(10)] for d in range(40)]
    sizes = {"test": 3_000, "valid": 1_000, "fusion": 4_000, "pretrain": 8_000}
    splits = deal_documents(docs, sizes, seed=3)
    owners = {s: {t[:5] for t in texts} for s, texts in splits.items()}
    for a in splits:
        assert sum(len(t) for t in splits[a]) == sizes[a]
        for b in splits:
            if a < b:
                assert not owners[a] & owners[b], (a, b)
    # a held-out split spreads over >= 5 documents (600 characters of each at most here) ...
    assert len(owners["test"]) >= 5
    # ... while training splits take whole documents (1,300 characters each)
    assert len(owners["pretrain"]) == -(-8_000 // 1_300)
    assert deal_documents(docs, sizes, seed=3) == splits


def test_document_split_names_the_split_that_runs_dry():
    from fuseserve.experiment.corpus import deal_documents

    with pytest.raises(ValueError, match=r"pretrain_chars: .* 3 documents"):
        deal_documents([["x" * 100]] * 3, {"pretrain": 1_000})


def test_out_of_distribution_text_is_present_and_not_in_the_corpus(tmp_path):
    from fuseserve.experiment.corpus import OOD_DOMAINS

    cfg = CorpusConfig(
        pretrain_chars=20_000, expert_chars=0, fusion_chars=5_000, valid_chars=1_000,
        test_chars=3_000, ood=("prose", "code", "c"), ood_chars=4_000,
    )  # fmt: skip
    corpus = build_corpus(cfg, tmp_path)
    assert corpus.ood_domains == ("ood-prose", "ood-code", "ood-c")
    held = corpus.heldout("ood")
    inside = {t for s in ("pretrain", "fusion", "valid", "test") for d in cfg.domains
              for t in corpus.texts(s, d)}  # fmt: skip
    for name, texts in held.items():
        assert sum(len(t) for t in texts) == 4_000 and not inside & set(texts), name
    assert "GNU" in " ".join(OOD_DOMAINS["prose"]())  # Debian's licence texts
    assert "import" in held["ood-code"][0] or "def " in " ".join(held["ood-code"])
    assert "#define" in " ".join(held["ood-c"])
    # the in-distribution fingerprint does not depend on the OOD texts
    plain = build_corpus(cfg.model_copy(update={"ood": ()}), tmp_path / "plain")
    assert plain.fingerprint == corpus.fingerprint and plain.ood_domains == ()
