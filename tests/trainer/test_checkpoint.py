"""Which checkpoint folders count as complete (no Ray: folders written by hand)."""

from __future__ import annotations

import json

from fuseserve.trainer.checkpoint import (
    COMPLETE_FILE,
    STATE_FILE,
    checkpoint_complete,
    find_latest_checkpoint,
)


def write(folder, step, files, **state):
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"step": step, **state}))
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    return folder


def test_only_marked_checkpoints_are_resumed_from(tmp_path):
    shards = ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "scheduler.pt"]
    shards += ["rng/rank0.pt", "rng/rank1.pt"]
    fsdp = dict(parallel="fsdp", world=2)
    done = write(tmp_path / "run" / "a", 2, [*shards, COMPLETE_FILE], **fsdp)
    cut = write(tmp_path / "run" / "b", 4, shards, **fsdp)  # killed before the marker
    assert checkpoint_complete(done) and not checkpoint_complete(cut)
    assert find_latest_checkpoint(str(tmp_path), "run") == done
    # Ray's registered checkpoint is checked file by file: every rank's RNG state is needed
    assert checkpoint_complete(cut, registered=True)
    (cut / "rng" / "rank1.pt").unlink()
    assert not checkpoint_complete(cut, registered=True)


def test_checkpoints_from_before_the_marker_still_resume(tmp_path):
    old = ["model/config.json", "optimizer.pt", "scheduler.pt"]
    ok = write(tmp_path / "run" / "a", 10, old)
    partial = write(tmp_path / "run" / "b", 20, old[:2])
    assert checkpoint_complete(ok) and not checkpoint_complete(partial)
    assert find_latest_checkpoint(str(tmp_path), "run") == ok
    (tmp_path / "run" / "c").mkdir()
    (tmp_path / "run" / "c" / STATE_FILE).write_text('{"step": 3')  # half-written
    assert find_latest_checkpoint(str(tmp_path), "run") == ok
