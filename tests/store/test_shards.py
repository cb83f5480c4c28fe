"""The shard layout on its own: rows of any width round-trip exactly (float16 probabilities), chat
masks survive, a row with padding before a listed entry is refused."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from fuseserve.store.shards import ShardFile, read_shard, write_shard
from fuseserve.trainer.data import Block
from fuseserve.wire.messages import FusedBlock


def fused_block(rng, n: int, width: int, extra_rows: int = 0) -> FusedBlock:
    """n + extra_rows rows, row i listing a random number (0..width) of entries, padded."""
    rows = n + extra_rows
    lengths = rng.integers(0, width + 1, rows)
    ids = np.full((rows, width), -1, dtype=np.int32)
    probs = np.zeros((rows, width), dtype=np.float32)
    for i, m in enumerate(lengths):
        ids[i, :m] = rng.choice(32000, m, replace=False)
        probs[i, :m] = np.sort(rng.dirichlet(np.ones(m + 1))[:m])[::-1]
    return FusedBlock(
        target_ids=rng.integers(0, 32000, rows).astype(np.int32),
        ids=ids,
        probs=probs,
        tail=rng.random(rows).astype(np.float32) * 0.1,
        chosen=rng.integers(-1, 2, rows).astype(np.int16),
        ce=rng.random(2).astype(np.float32),
        coverage=rng.random(2).astype(np.float32),
        teachers=("a", "b"),
    )


def test_rows_round_trip_exactly_at_their_width(tmp_path):
    rng = np.random.default_rng(0)
    blocks, fused = [], []
    for index, (n, width) in enumerate([(7, 3), (5, 12), (9, 1), (4, 0)]):
        f = fused_block(rng, n, width, extra_rows=2)  # the aligner may answer past the block
        mask = rng.random(n) < 0.5 if index == 1 else None
        blocks.append(Block(10 + index, "", f.target_ids[:n].astype(np.int64), mask))
        fused.append(f)
    path = tmp_path / "shard.parquet"
    write_shard(path, blocks, fused)
    back = read_shard(path, ["a", "b"])
    assert sorted(back) == [10, 11, 12, 13]
    for block, f in zip(blocks, fused):
        ids, got = back[block.index]
        n = len(block.ids)
        assert np.array_equal(ids, block.ids)
        assert got.ids.shape == (n, f.ids.shape[1]) and np.array_equal(got.ids, f.ids[:n])
        want_p = f.probs[:n].astype(np.float16).astype(np.float32)
        assert np.array_equal(got.probs, np.where(f.ids[:n] >= 0, want_p, 0))
        assert np.array_equal(got.tail, f.tail_mass[:n].astype(np.float16).astype(np.float32))
        assert np.array_equal(got.chosen, f.chosen[:n]) and np.array_equal(got.ce, f.ce)
    table = pq.read_table(path, columns=["loss_mask"])
    assert table.column("loss_mask")[1].as_py() == blocks[1].loss_mask.tolist()
    assert table.column("loss_mask")[0].as_py() is None
    shard = ShardFile(path, ["a", "b"])
    assert np.array_equal(shard.block(2)[1].ids, back[12][1].ids)


def test_a_row_with_padding_before_a_listed_entry_is_refused(tmp_path):
    f = fused_block(np.random.default_rng(1), 3, 4)
    ids = f.ids.copy()
    ids[0] = [5, -1, 7, -1]
    bad = FusedBlock(f.target_ids, ids, f.probs, f.chosen, f.ce, f.coverage, f.teachers)
    block = Block(0, "", f.target_ids.astype(np.int64))
    with pytest.raises(ValueError, match="padding inside a row"):
        write_shard(tmp_path / "bad.parquet", [block], [bad])
