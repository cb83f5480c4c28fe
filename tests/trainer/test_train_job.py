"""The Ray Train job for real: 2 CPU workers against a live aligner; resume after a kill."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from fuseserve.trainer.config import load_config
from fuseserve.trainer.job import run_training
from tests.trainer.conftest import (
    assert_same_weights,
    interrupted_run,
    read_metrics,
    resume,
    small_run,
)

pytestmark = pytest.mark.slow


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
    common = small_run(
        tiny_dirs,
        corpus,
        tmp_path,
        block_size=128,
        batch_size=2,
        max_steps=40,
        num_workers=1,
        lam=1.0,
        checkpoint_every=10,
    )
    saved = interrupted_run(
        common, tmp_path / "killed.jsonl", lambda proc: proc.send_signal(signal.SIGTERM)
    )
    killed_steps = [m["step"] for m in read_metrics(tmp_path / "killed.jsonl")]
    assert killed_steps[-1] < 40, "the run finished before it could be killed"
    assert saved["step"] % 10 == 0 and saved["blocks_seen"] == saved["step"] * 2

    resumed, resumed_metrics = resume(common, tmp_path)
    assert resumed_metrics[0]["step"] == saved["step"] + 1
    assert resumed_metrics[0]["blocks_seen"] == saved["blocks_seen"] + 2
    assert resumed_metrics[-1]["step"] == 40

    straight, _ = resume(common, tmp_path, "straight", checkpoint_every=40)
    assert_same_weights(resumed.model_dir, straight.model_dir, atol=1e-5)
