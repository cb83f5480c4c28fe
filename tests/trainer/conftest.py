"""Fixtures and helpers of the Ray Train tests: one local Ray per module, a small corpus."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, prose):
    path = tmp_path_factory.mktemp("corpus") / "prose.txt"
    path.write_text(prose[:20000])
    return str(path)


def read_metrics(path) -> list[dict]:
    """The step rows of a metrics file (held-out rows left out)."""
    return [json.loads(line) for line in open(path) if '"loss"' in line]


def train_flags(settings: dict) -> list[str]:
    """``fuseserve train`` flags for settings (lists comma-separated)."""
    flags = []
    for key, value in settings.items():
        flags += [
            "--" + key.replace("_", "-"),
            ",".join(value) if isinstance(value, list) else str(value),
        ]
    return flags


def interrupted_run(settings: dict, metrics_file, stop) -> dict:
    """Start ``fuseserve train`` as a process under the name "killed", wait for its first complete
    checkpoint, ``stop(proc)`` it, and return the state saved in the newest checkpoint."""
    import subprocess
    import sys

    from fuseserve.launch import wait_until
    from fuseserve.trainer.checkpoint import STATE_FILE, find_latest_checkpoint

    flags = train_flags({**settings, "name": "killed", "metrics_file": str(metrics_file)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuseserve.cli", "train", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def still_running() -> None:
            assert proc.poll() is None, "the run ended before its first checkpoint"

        wait_until(
            lambda: find_latest_checkpoint(settings["storage_path"], "killed"),
            300,
            "the first checkpoint",
            alive=still_running,
        )
        stop(proc)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoint = find_latest_checkpoint(settings["storage_path"], "killed")
    return json.loads((checkpoint / STATE_FILE).read_text())


def resume(settings: dict, tmp_path, name: str = "killed", **overrides):
    """Run (or resume) ``name`` to the end in this process: (result, step rows)."""
    from fuseserve.trainer.config import load_config
    from fuseserve.trainer.job import run_training

    result = run_training(
        load_config(
            **{**settings, **overrides},
            name=name,
            metrics_file=str(tmp_path / f"{name}.resumed.jsonl"),
            export_dir=str(tmp_path / f"{name}-model"),
        )
    )
    return result, read_metrics(tmp_path / f"{name}.resumed.jsonl")


def assert_same_weights(dir_a, dir_b, atol: float) -> None:
    """Two exported Hugging Face models hold the same tensors (within ``atol``)."""
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(dir_a).state_dict()
    b = AutoModelForCausalLM.from_pretrained(dir_b).state_dict()
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=10 * atol)


def small_run(tiny_dirs, corpus, tmp_path, **settings) -> dict:
    """Settings of a small run: the tiny SentencePiece model on the corpus, one torch thread
    per worker, lr 1e-3, runs under ``tmp_path/runs`` (``settings`` add or override)."""
    base = dict(
        model=str(tiny_dirs["spm"]),
        data=[corpus],
        torch_threads=1,
        lr=1e-3,
        storage_path=str(tmp_path / "runs"),
    )
    return {**base, **settings}
