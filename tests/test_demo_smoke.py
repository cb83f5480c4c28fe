"""The demo pipeline at its minimal size: every stage runs as in `make demo`, as processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


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
        assert set(row) == {"code", "prose"}
        assert all(math.isfinite(v) and v > 0 for v in row.values())
    # the real SmolLM2 is far better than an (almost) untrained small model
    assert rows["teacher: SmolLM2-135M"]["prose"] < rows["target before training"]["prose"]
    assert (tmp_path / "fuseserve-demo.png").stat().st_size > 10_000
    lines = (tmp_path / "fused-metrics.jsonl").read_text().splitlines()
    fused = [json.loads(line) for line in lines]
    assert len(fused) == 3 and all(m["fusion_loss"] > 0 for m in fused)
