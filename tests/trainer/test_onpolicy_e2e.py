"""On-policy training against a live aligner with real teacher processes: the samples go to the
aligner as ids and the loss sees exactly its rows; two FSDP workers with accumulation on Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fuseserve.client import FuseParams, GrpcClient
from fuseserve.trainer.config import TrainConfig, load_config
from fuseserve.trainer.job import run_training
from fuseserve.trainer.recipe import FusionRecipe
from tests.trainer.conftest import read_metrics
from tests.trainer.test_recipe import OneProcess

pytestmark = pytest.mark.slow


class RecordingRecipe(FusionRecipe):
    """The recipe with its real stream, keeping every fused row the stream hands out."""

    def open_stream(self):
        stream = super().open_stream()
        self.received = []
        get = stream.get

        def recording_get(expected, fed=False):
            fused = get(expected, fed)
            self.received.append((expected, fused))
            return fused

        stream.get = recording_get
        return stream


def test_samples_are_judged_as_ids_by_the_aligner(aligner, tiny_dirs, corpus, tmp_path):
    cfg = TrainConfig(
        model=str(tiny_dirs["spm"]),
        data=[corpus],
        block_size=32,
        batch_size=2,
        max_steps=2,
        torch_threads=1,
        lam=1.0,
        lr=1e-3,
        aligner=aligner.grpc_address,
        preset="spans",
        on_policy=1.0,
        onpolicy_loss="sampled_rkl",
        prompt_tokens=12,
        max_new_tokens=8,
        storage_path=str(tmp_path / "runs"),
        name="judged",
        metrics_file=str(tmp_path / "metrics.jsonl"),
    )
    run = RecordingRecipe(cfg, OneProcess(cfg))
    run.run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["onpolicy"] and math.isfinite(r["loss"]) for r in rows)
    assert all(0 < r["teacher_nll"] < 20 for r in rows)
    assert len(run.received) == 4  # 2 steps x 2 samples
    params = FuseParams(preset="spans", float_dtype="f16")
    with GrpcClient(aligner.grpc_address) as client:
        for sample, fused in run.received:
            n = len(sample.ids)
            assert sample.loss_mask.sum() >= 1 and not sample.loss_mask[:12].any()
            direct = client.fuse(None, params, token_ids=[sample.ids.tolist()]).blocks[0].block
            np.testing.assert_array_equal(fused.target_ids, sample.ids)
            np.testing.assert_array_equal(direct.target_ids, sample.ids)
            for t in range(12, n):  # row t − 1 lists the sampled token (the chain rule)
                assert sample.ids[t] in fused.ids[t - 1]
            width = direct.ids.shape[1]
            np.testing.assert_array_equal(fused.ids[: n - 1, :width], direct.ids[: n - 1])
            np.testing.assert_allclose(fused.probs[: n - 1, :width], direct.probs[: n - 1])


def test_two_fsdp_workers_train_on_policy_with_accumulation(
    ray_session, aligner, tiny_dirs, corpus, tmp_path
):
    before = aligner.metric("fuseserve_aligner_blocks_total", {"source": "computed"})
    cfg = load_config(
        model=str(tiny_dirs["spm"]),
        data=[corpus],
        block_size=32,
        batch_size=1,
        grad_accum=2,
        max_steps=4,
        num_workers=2,
        parallel="fsdp",
        torch_threads=1,
        lam=0.5,
        lr=1e-3,
        aligner=aligner.grpc_address,
        preset="spans",
        on_policy=0.5,
        onpolicy_loss="jsd",
        jsd_beta=0.5,
        max_new_tokens=6,
        storage_path=str(tmp_path / "runs"),
        name="fsdp-onpolicy",
        checkpoint_every=4,
        metrics_file=str(tmp_path / "metrics.jsonl"),
    )
    run_training(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["onpolicy"] for r in rows] == [False, True, False, True]
    for r in rows:
        assert math.isfinite(r["loss"])
        if r["onpolicy"]:
            assert 1 <= r["completion_len_mean"] <= 6 and r["onpolicy_divergence"] >= 0
            assert 0 < r["generation_fraction"] < 1 and r["teacher_nll"] > 0
        else:
            assert r["fusion_loss"] > 0
    # both workers' samples (2 on-policy steps x 2 sequences each) were fused as new blocks
    computed = aligner.metric("fuseserve_aligner_blocks_total", {"source": "computed"})
    assert computed - before >= 8
