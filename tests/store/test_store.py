"""The fused store end to end: export from a live aligner (tiny teacher processes, Redis), the
manifest, training from the store vs online, refusals, resuming a killed export, datasets."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from fuseserve.store.config import ExportConfig
from fuseserve.store.export import run_export
from fuseserve.store.manifest import StoreMismatch, read_manifest, write_manifest
from fuseserve.store.reader import FusedStore, StoreCorrupt
from fuseserve.store.shards import file_sha256
from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.recipe import FusionRecipe
from tests.store_fixtures import export_settings, store_run
from tests.trainer.conftest import read_metrics
from tests.trainer.test_recipe import OneProcess


def run_recipe(settings: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg = TrainConfig(**settings)
    recipe = FusionRecipe(cfg, OneProcess(cfg))
    recipe.run()
    return read_metrics(settings["metrics_file"]), recipe.model.state_dict()


def blocks_of(settings: dict):
    from fuseserve.loading import load_tokenizer
    from fuseserve.trainer.data import build_blocks

    cfg = TrainConfig(**settings)
    return cfg, load_tokenizer(cfg.model), build_blocks(cfg, load_tokenizer(cfg.model))


def test_the_manifest_records_teachers_fusion_layout_and_shard_checksums(fused_store):
    manifest = read_manifest(fused_store.folder)
    assert manifest.complete and len(manifest.shards) == manifest.num_shards >= 3
    assert [t.name for t in manifest.teachers] == ["spm", "bpe"]
    assert all(t.revision and t.cache_fingerprint for t in manifest.teachers)
    assert manifest.fusion.preset == "spans" and manifest.fusion.aligner_default_k > 0
    assert manifest.layout.block_size == 32 and manifest.layout.shard_blocks == 8
    assert sum(s.num_blocks for s in manifest.shards) == manifest.layout.num_blocks
    for shard in manifest.shards:
        assert file_sha256(fused_store.folder / shard.file) == shard.sha256


def test_store_blocks_are_the_online_streams_bit_for_bit(fused_store, tiny_dirs, tmp_path):
    from fuseserve.trainer.prefetch import FusedTargetStream

    _, _, blocks = blocks_of(store_run(tiny_dirs, fused_store, tmp_path))
    store = FusedStore(fused_store.folder)
    online = FusedTargetStream(
        fused_store.aligner, blocks, iter(range(len(blocks))), preset="spans"
    )
    online.start()
    try:
        for block in blocks:
            want, got, n = online.get(block), store.get(block), len(block.ids)
            assert got.ids.shape == (n, want.ids.shape[1])
            assert np.array_equal(got.ids, want.ids[:n])
            assert np.array_equal(got.tail, want.tail[:n])
            listed = want.ids[:n] >= 0
            assert np.array_equal(got.probs[listed], want.probs[:n][listed])
            assert got.tail.any() or block.index > 0  # the spans preset keeps tail mass
    finally:
        online.close()


def test_training_from_the_store_equals_the_online_run_bit_for_bit(
    fused_store, tiny_dirs, tmp_path
):
    offline = store_run(tiny_dirs, fused_store, tmp_path / "store")
    online = {**offline, "fused_from": None, "aligner": fused_store.aligner}
    online.update(storage_path=str(tmp_path / "on"), metrics_file=str(tmp_path / "on.jsonl"))
    rows_store, weights_store = run_recipe(offline)
    rows_online, weights_online = run_recipe(online)
    assert len(rows_store) == len(rows_online) == 20
    for a, b in zip(rows_store, rows_online):
        assert (a["loss"], a["clm_loss"], a["fusion_loss"]) == (
            b["loss"],
            b["clm_loss"],
            b["fusion_loss"],
        )
    assert rows_store[-1]["fusion_loss"] > 0
    assert weights_store.keys() == weights_online.keys()
    for name, tensor in weights_store.items():
        assert torch.equal(tensor, weights_online[name]), name


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"block_size": 24}, "layout.block_size"),
        ({"preset": "default"}, "fusion.preset"),
        ({"k": 4}, "fusion.k"),
        ({"tokenizer": "bpe"}, "target_fingerprint"),
    ],
)
def test_a_run_that_does_not_match_the_store_is_refused_naming_the_field(
    fused_store, tiny_dirs, tmp_path, change, field
):
    from fuseserve.wire.tokenizer import TokenizerIdentity

    if "tokenizer" in change:
        change = {"tokenizer": str(tiny_dirs[change["tokenizer"]])}
    cfg, _, _ = blocks_of(store_run(tiny_dirs, fused_store, tmp_path, **change))
    recipe = FusionRecipe(cfg, OneProcess(cfg))
    with pytest.raises(StoreMismatch, match=field.replace(".", r"\.")):
        recipe.setup()
    # and the data: other text, same block size
    other = tmp_path / "other.txt"
    other.write_text(Path(fused_store.corpus).read_text()[::-1])
    cfg, tok, blocks = blocks_of(store_run(tiny_dirs, fused_store, tmp_path, data=[str(other)]))
    with pytest.raises(StoreMismatch, match=r"layout\.(num_blocks|data_fingerprint)"):
        FusedStore(fused_store.folder).check_run(
            cfg, TokenizerIdentity.from_hf(tok).fingerprint, blocks
        )


def test_an_unfinished_or_altered_store_is_refused(fused_store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fused_store.folder, copy)
    manifest = read_manifest(copy)
    write_manifest(copy, manifest.model_copy(update={"complete": False}))
    with pytest.raises(StoreMismatch, match="unfinished"):
        FusedStore(copy)
    write_manifest(copy, manifest)
    shard = copy / manifest.shards[1].file
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    store = FusedStore(copy)
    from fuseserve.trainer.data import Block

    with pytest.raises(StoreCorrupt, match=manifest.shards[1].file.split("/")[-1]):
        store.get(Block(manifest.shards[1].first_block, "", np.zeros(1, dtype=np.int64)))


def export_then_kill(settings: dict, kill_after: int) -> None:
    """Child process: export, SIGKILL this process when block ``kill_after`` has arrived."""

    def on_block(index: int) -> None:
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    run_export(ExportConfig(**settings), progress=False, on_block=on_block)


def test_a_killed_export_keeps_its_finished_shards_and_redoes_the_rest(
    fused_store, tiny_dirs, tmp_path
):
    settings = export_settings(tiny_dirs, fused_store.corpus, fused_store.aligner, tmp_path / "s")
    child = multiprocessing.get_context("spawn").Process(
        target=export_then_kill, args=(settings, 28)
    )
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL
    killed = read_manifest(tmp_path / "s")
    assert not killed.complete and [s.index for s in killed.shards] == [0, 1, 2]
    with pytest.raises(StoreMismatch, match="unfinished"):
        FusedStore(tmp_path / "s")
    kept = tmp_path / "s" / killed.shards[0].file
    inode = kept.stat().st_ino
    changed = tmp_path / "s" / killed.shards[2].file
    changed.write_bytes(b"not the shard the manifest recorded")
    report = run_export(ExportConfig(**settings), progress=False)
    assert report.blocks_kept == 16  # shards 0 and 1; shard 2 failed its checksum
    assert kept.stat().st_ino == inode
    resumed, clean = read_manifest(tmp_path / "s"), read_manifest(fused_store.folder)
    assert resumed.complete
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in clean.shards]


def test_an_export_into_another_exports_folder_is_refused_naming_the_field(
    fused_store, tiny_dirs, tmp_path
):
    import shutil

    shutil.copytree(fused_store.folder, tmp_path / "s")
    settings = export_settings(
        tiny_dirs, fused_store.corpus, fused_store.aligner, tmp_path / "s", preset="default"
    )
    with pytest.raises(StoreMismatch, match=r"out: the store's fusion\.preset is 'spans'"):
        run_export(ExportConfig(**settings), progress=False)


def test_datasets_reads_the_shards_without_fuseserve(fused_store, tiny_dirs, tmp_path):
    from datasets import load_dataset

    pattern = str(fused_store.folder / "shards" / "*.parquet")
    ds = load_dataset("parquet", data_files=pattern, split="train")
    manifest = json.loads((fused_store.folder / "manifest.json").read_text())
    assert len(ds) == manifest["layout"]["num_blocks"]
    assert ds.features["fused_probs"].feature.feature.dtype == "float16"
    _, _, blocks = blocks_of(store_run(tiny_dirs, fused_store, tmp_path))
    store = FusedStore(fused_store.folder)
    for row in (ds[0], ds[len(ds) - 1]):
        want = store.get(blocks[row["block"]])
        assert row["input_ids"] == blocks[row["block"]].ids.tolist()
        for i, (ids, probs) in enumerate(zip(row["fused_ids"], row["fused_probs"])):
            assert ids == want.ids[i, : len(ids)].tolist()
            assert np.array_equal(np.float32(probs), want.probs[i, : len(ids)])
        assert np.array_equal(np.float32(row["fused_tail"]), want.tail)


def test_the_cli_exports_and_train_refuses_a_mismatched_store_before_ray(
    fused_store, tiny_dirs, tmp_path, capsys
):
    from fuseserve.cli import main

    flags = ["--tokenizer", str(tiny_dirs["spm"]), "--data", fused_store.corpus]
    flags += ["--block-size", "32", "--preset", "spans", "--shard-blocks", "8"]
    assert main(["export", *flags, "--aligner", fused_store.aligner, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "blocks/s" in out and "B per token" in out
    assert [s.sha256 for s in read_manifest(tmp_path).shards] == [
        s.sha256 for s in read_manifest(fused_store.folder).shards
    ]
    train = ["train", "--model", str(tiny_dirs["spm"]), "--data", fused_store.corpus]
    train += ["--preset", "spans", "--fused-from", str(tmp_path)]
    train += ["--storage-path", str(tmp_path / "runs")]
    assert main([*train, "--block-size", "24"]) == 2
    assert "fused_from: the store's layout.block_size is 32" in capsys.readouterr().err
    # the matching run, as a user starts it: a Ray Train job with no aligner named
    import subprocess
    import sys

    metrics = tmp_path / "from-store.jsonl"
    train += ["--block-size", "32", "--max-steps", "3", "--batch-size", "2", "--lam", "0.5"]
    train += ["--torch-threads", "1", "--metrics-file", str(metrics), "--name", "from-store"]
    done = subprocess.run(
        [sys.executable, "-m", "fuseserve.cli", *train], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["fusion_loss"] > 0 for r in rows)
