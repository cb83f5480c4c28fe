"""The Ray Train job for real: 2 CPU workers against a live aligner; resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from fuseserve.launch import wait_until
from fuseserve.trainer.config import load_config
from fuseserve.trainer.job import run_training
from fuseserve.trainer.loop import STATE_FILE, find_latest_checkpoint

pytestmark = pytest.mark.slow


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


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def test_two_workers_train_on_fused_targets_from_a_live_aligner(
    ray_session, aligner, tiny_dirs, corpus, tmp_path
):
    blocks_before = aligner.metric("fuseserve_aligner_blocks_total", {"source": "computed"})
    cfg = load_config(
        model=str(tiny_dirs["spm"]),  # the target starts from a source, as in the paper
        data=[corpus],
        block_size=64,
        batch_size=2,
        max_steps=4,
        num_workers=2,
        torch_threads=1,
        lam=0.5,
        lr=1e-3,
        aligner=aligner.grpc_address,
        storage_path=str(tmp_path / "runs"),
        name="fused",
        checkpoint_every=2,
        metrics_file=str(tmp_path / "metrics.jsonl"),
        export_dir=str(tmp_path / "final"),
        prefetch_depth=4,
    )
    result = run_training(cfg)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["fusion_loss"] > 0 and m["lam"] == 0.5 for m in metrics)
    assert all(
        m["loss"] == pytest.approx(0.5 * m["clm_loss"] + 0.5 * m["fusion_loss"]) for m in metrics
    )
    assert metrics[-1]["blocks_seen"] == 16 and 0.0 <= metrics[-1]["wait_fraction"] <= 1.0
    # every block of both workers was fused by the aligner
    computed = aligner.metric("fuseserve_aligner_blocks_total", {"source": "computed"})
    hits = aligner.metric("fuseserve_aligner_blocks_total", {"source": "hit"})
    assert computed + hits - blocks_before >= 16
    # the exported model is a Hugging Face model that differs from where it started
    trained = AutoModelForCausalLM.from_pretrained(result.model_dir)
    start = AutoModelForCausalLM.from_pretrained(tiny_dirs["spm"])
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)


def test_a_killed_run_resumes_at_the_same_step_and_data_position(
    ray_session, tiny_dirs, corpus, tmp_path
):
    common = dict(
        model=str(tiny_dirs["spm"]),
        data=[corpus],
        block_size=128,
        batch_size=2,
        max_steps=40,
        num_workers=1,
        torch_threads=1,
        lam=1.0,
        lr=1e-3,
        checkpoint_every=10,
        storage_path=str(tmp_path / "runs"),
    )
    flags = []
    for key, value in {**common, "name": "killed"}.items():
        flags += [
            "--" + key.replace("_", "-"),
            ",".join(value) if isinstance(value, list) else str(value),
        ]
    flags += ["--metrics-file", str(tmp_path / "killed.jsonl")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuseserve.cli", "train", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:

        def still_running() -> None:
            assert proc.poll() is None, "the run ended before its first checkpoint"

        wait_until(
            lambda: find_latest_checkpoint(common["storage_path"], "killed"),
            240,
            "the first checkpoint",
            alive=still_running,
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_steps = [m["step"] for m in read_metrics(tmp_path / "killed.jsonl")]
    assert killed_steps[-1] < 40, "the run finished before it could be killed"
    checkpoint = find_latest_checkpoint(common["storage_path"], "killed")
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    assert saved["step"] % 10 == 0 and saved["blocks_seen"] == saved["step"] * 2

    resumed = run_training(
        load_config(
            **common,
            name="killed",
            metrics_file=str(tmp_path / "resumed.jsonl"),
            export_dir=str(tmp_path / "resumed-model"),
        )
    )
    resumed_metrics = read_metrics(tmp_path / "resumed.jsonl")
    assert resumed_metrics[0]["step"] == saved["step"] + 1
    assert resumed_metrics[0]["blocks_seen"] == saved["blocks_seen"] + 2
    assert resumed_metrics[-1]["step"] == 40

    straight = run_training(
        load_config(
            **{**common, "checkpoint_every": 40},
            name="straight",
            export_dir=str(tmp_path / "straight-model"),
        )
    )
    a = AutoModelForCausalLM.from_pretrained(resumed.model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(straight.model_dir).state_dict()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
