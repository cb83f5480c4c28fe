"""`fuseserve experiment --quick` end to end: every stage through the real system, then reused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run_quick(work: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "fuseserve.cli", "experiment",
        str(ROOT / "experiments" / "table7.yaml"), "--quick",
        "--runs", "clm-only,kd-best,fused-default,fused-spans",
        "--work-dir", str(work), "--cache-dir", str(cache),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_quick_table7_runs_every_stage_and_reuses_finished_work(tmp_path):
    work, cache = tmp_path / "work", tmp_path / "cache"
    first = run_quick(work, cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    rows = set(results["table"])
    assert rows == {
        "base", "expert-code", "expert-prose", "expert-c", "ensemble", "merge",
        "clm-only", "kd-best", "fused-default", "fused-spans",
    }  # fmt: skip
    for row in rows:
        cells = results["table"][row]
        in_corpus = {"code", "prose", "c", "mean"}
        assert set(cells) == in_corpus | {"ood-prose", "ood-code", "ood-c", "ood mean"}
        assert all(0 < c["mean"] < 20 for c in cells.values())
    assert results["best_source"] in ("expert-code", "expert-prose", "expert-c")
    runs = {r["run"]: r for r in results["runs"]}
    assert runs["kd-best"]["teachers"] == [results["best_source"]]
    assert runs["fused-spans"]["teachers"] == ["expert-code", "expert-prose", "expert-c"]
    assert runs["clm-only"]["teachers"] == []
    for r in runs.values():  # held-out BPB measured before, during and after training
        assert [p["step"] for p in r["curve"]] == [0, 2, 4]
        assert r["curve"][-1]["tokens_seen"] == 4 * 2 * 32
        # the curve is on the test split; the final model is also scored outside the corpus
        final_in = {d: v for d, v in r["final"].items() if not d.startswith("ood-")}
        assert final_in == r["curve"][-1]["eval_bpb"]
        assert {d for d in r["final"] if d.startswith("ood-")} == {"ood-prose", "ood-code", "ood-c"}
    # the base's BPB before training equals the curve's starting point
    start = runs["clm-only"]["curve"][0]["eval_bpb"]
    for d, value in start.items():
        assert value == pytest.approx(results["table"]["base"][d]["mean"], rel=1e-5)
    # one seed: no claim that involves a trained run is judged
    assert {c["verdict"] for c in results["claims"]} == {"untested (1 seed)"}
    # the claims that name only rows of this run (not the two that need fused-fusellm)
    assert len(results["claims"]) == 5
    assert not any("original code" in c["claim"] for c in results["claims"])
    for png in ("bpb-vs-tokens.png", "bpb-per-domain.png"):
        assert (work / png).read_bytes()[:4] == b"\x89PNG"
    assert "| fused-spans |" in (work / "results.md").read_text()
    assert "| fused-spans |" in first.stdout

    # started again: every model, evaluation and run is reused, nothing trains
    logs_before = sorted(p.name for p in (work / "logs").iterdir())
    second = run_quick(work, cache)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training runs: 4 (4 already done)" in second.stdout
    assert "train source" not in second.stderr
    assert sorted(p.name for p in (work / "logs").iterdir()) == logs_before
    again = json.loads((work / "results.json").read_text())
    assert again["table"] == results["table"]
