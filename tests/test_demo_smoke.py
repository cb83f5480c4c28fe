"""The demo pipeline at its minimal size: every stage runs as in `make demo`, as processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_minimal_demo_produces_the_table_and_the_plot(tmp_path):
    env = {**os.environ, "FUSESERVE_CACHE": str(tmp_path / "cache")}
    env.pop("REDIS_URL", None)
    run = subprocess.run(
        [sys.executable, "-m", "fuseserve.cli", "demo", "--minimal", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Held-out bits per UTF-8 byte" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["bpb"]
    assert set(rows) == {
        "target before training",
        "CLM only",
        "fused (FuseLLM)",
        "teacher: SmolLM2-135M",
        "teacher: small SentencePiece",
    }
    for row in rows.values():
        assert set(row) == {"code", "prose", "ood-prose", "ood-code"}
        assert all(math.isfinite(v) and v > 0 for v in row.values())
    # the real SmolLM2 is far better than an (almost) untrained small model
    assert rows["teacher: SmolLM2-135M"]["prose"] < rows["target before training"]["prose"]
    assert (tmp_path / "fuseserve-demo.png").stat().st_size > 10_000
    # 3 steps of 1 x 32 tokens over the target's text, counted with its tokenizer
    assert results["target_text_tokens"] > 1000
    assert results["passes"] == pytest.approx(3 * 32 / results["target_text_tokens"])
    assert "passes over the target's" in run.stdout
    lines = (tmp_path / "fused-metrics.jsonl").read_text().splitlines()
    fused = [json.loads(line) for line in lines]
    assert len(fused) == 3 and all(m["fusion_loss"] > 0 for m in fused)


def test_demo_corpus_trains_the_target_on_text_its_start_never_saw(tmp_path):
    """The small model trains on pretrain.jsonl, the target on train.jsonl: no document in both
    (continuing on the start's own text made CLM-only training worse); held-out text is the test
    split and text from outside the corpus."""
    from fuseserve.demo import HELDOUT, DemoConfig, build_corpus

    cfg = DemoConfig.minimal_size(str(tmp_path))
    train, heldout, pretrain = build_corpus(cfg, tmp_path / "corpus")
    read = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    start = [json.loads(line)["text"] for line in pretrain.read_text().splitlines()]
    assert set(heldout) == set(HELDOUT) == {"code", "prose", "ood-prose", "ood-code"}
    assert sum(map(len, read)) == 2 * cfg.train_chars
    assert sum(map(len, start)) == 2 * cfg.pretrain_chars
    texts = [t for ts in heldout.values() for t in ts]
    assert not set(read) & set(start) and not set(texts) & (set(read) | set(start))
