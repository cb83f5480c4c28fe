"""One shard of a fused store: consecutive blocks as one parquet file, one row per block.

Columns (n = the block's tokens, w_i = entries listed in row i, K = teachers):

- ``block`` int32: the block's index in corpus order;
- ``input_ids`` list<int32> [n]: the target ids the block trains on;
- ``loss_mask`` list<bool> [n] (chat blocks) or null;
- ``width`` int16: the width of the aligner's padded rows for this block (rebuilds the exact
  [n, width] arrays the online stream hands the trainer);
- ``fused_ids`` list<list<int32>> [n][w_i] and ``fused_probs`` list<list<float16>> [n][w_i]:
  row i's listed entries (it predicts token i + 1), most probable first, as the aligner sent them;
- ``fused_tail`` list<float16> [n]: row i's mass on no listed id;
- ``chosen`` list<int16> [n]: the teacher whose row was taken (−1: averaged or none);
- ``ce``, ``coverage`` list<float32> [K]: per teacher, in the manifest's teacher order.

Probabilities are float16, the width the trainer's online stream receives them in, so a run from
the store sees the same bits as a run online. Rows are stored without padding; a block whose
padding is not at its rows' ends cannot be stored exactly and is refused.

A row group holds whole blocks (about 16k tokens), so a reader that needs one block (training
reads blocks in a shuffled order) decodes one group, not the shard.

Leaves out: which blocks go in which shard, checksums in the manifest (``export``), choosing
blocks for a step (``reader``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fuseserve.trainer.data import Block
from fuseserve.wire.messages import FusedBlock

SCHEMA = pa.schema(
    [
        ("block", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.bool_())),
        ("width", pa.int16()),
        ("fused_ids", pa.list_(pa.list_(pa.int32()))),
        ("fused_probs", pa.list_(pa.list_(pa.float16()))),
        ("fused_tail", pa.list_(pa.float16())),
        ("chosen", pa.list_(pa.int16())),
        ("ce", pa.list_(pa.float32())),
        ("coverage", pa.list_(pa.float32())),
    ]
)

# zstd over parquet's plain encodings, probabilities byte-stream-split (their high and low bytes
# compress apart); measured against the alternatives in bench/bench_store.py
WRITE_OPTIONS = {
    "compression": "zstd",
    "compression_level": 9,
    "use_dictionary": False,
    "column_encoding": {
        "fused_probs.list.element.list.element": "BYTE_STREAM_SPLIT",
        "fused_tail.list.element": "BYTE_STREAM_SPLIT",
    },
    "write_statistics": False,
}
ROW_GROUP_TOKENS = 16384  # a row group holds whole blocks, about this many tokens


def listed_lengths(block: FusedBlock, n: int) -> np.ndarray:
    """Entries listed per row [n] of the block's first n rows; ``ValueError`` when a row has
    padding (id −1) before a listed entry (its layout could not be rebuilt)."""
    listed = block.ids[:n] >= 0
    lengths = listed.sum(axis=1)
    if not np.array_equal(listed, np.arange(block.ids.shape[1])[None, :] < lengths[:, None]):
        raise ValueError("fused block: padding inside a row; a store keeps rows padded at the end")
    return lengths


def _lists(values: np.ndarray, lengths: np.ndarray, kind: pa.DataType) -> pa.ListArray:
    """values [sum(lengths)] cut into lists of ``lengths`` (int64 offsets)."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=kind))


def shard_table(blocks: Sequence[Block], fused: Sequence[FusedBlock]) -> pa.Table:
    """The table of one shard: row b is ``blocks[b]`` with the first n rows of ``fused[b]``."""
    sizes = [len(b.ids) for b in blocks]
    lengths = [listed_lengths(f, n) for f, n in zip(fused, sizes)]
    row_lengths = np.concatenate(lengths)
    listed = [f.ids[:n] >= 0 for f, n in zip(fused, sizes)]
    ids = np.concatenate([f.ids[:n][m] for f, n, m in zip(fused, sizes, listed)])
    probs = np.concatenate([f.probs[:n][m] for f, n, m in zip(fused, sizes, listed)])
    per_block = np.asarray(sizes)
    teachers = np.asarray([len(f.ce) for f in fused])
    tails = [f.tail_mass[:n] for f, n in zip(fused, sizes)]
    chosen = [f.chosen[:n] for f, n in zip(fused, sizes)]
    columns = {
        "block": pa.array([b.index for b in blocks], type=pa.int32()),
        "input_ids": _lists(np.concatenate([b.ids for b in blocks]), per_block, pa.int32()),
        "loss_mask": pa.array(
            [None if b.loss_mask is None else b.loss_mask.tolist() for b in blocks],
            type=pa.list_(pa.bool_()),
        ),
        "width": pa.array([f.ids.shape[1] for f in fused], type=pa.int16()),
        "fused_ids": _nested(ids, row_lengths, per_block, pa.int32()),
        "fused_probs": _nested(probs.astype(np.float16), row_lengths, per_block, pa.float16()),
        "fused_tail": _lists(_cat(tails, np.float16), per_block, pa.float16()),
        "chosen": _lists(_cat(chosen, np.int16), per_block, pa.int16()),
        "ce": _lists(_cat([f.ce for f in fused], np.float32), teachers, pa.float32()),
        "coverage": _lists(_cat([f.coverage for f in fused], np.float32), teachers, pa.float32()),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _nested(values, row_lengths, block_rows, kind) -> pa.ListArray:
    """values cut into rows of ``row_lengths``, rows grouped into blocks of ``block_rows``."""
    rows = _lists(values, row_lengths, kind)
    offsets = np.concatenate([[0], np.cumsum(block_rows, dtype=np.int64)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), rows)


def write_shard(path: Path, blocks: Sequence[Block], fused: Sequence[FusedBlock]) -> None:
    """Write one shard file in row groups of whole blocks (about ``ROW_GROUP_TOKENS`` tokens, so
    a reader that needs one block decodes that group only); the caller renames it into place."""
    longest = max((len(b.ids) for b in blocks), default=1)
    group = max(1, ROW_GROUP_TOKENS // max(longest, 1))
    pq.write_table(shard_table(blocks, fused), path, row_group_size=group, **WRITE_OPTIONS)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardFile:
    """Blocks of one shard file by their row in it, decoding a row group at a time (the last one
    decoded is kept: blocks read in shard order decode each group once)."""

    def __init__(self, path: Path, teachers: Sequence[str]) -> None:
        self.file = pq.ParquetFile(path)
        self.teachers = tuple(teachers)
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._group: tuple[int, dict] | None = None

    def block(self, row: int) -> tuple[np.ndarray, FusedBlock]:
        """(input_ids [n] int64, fused block of n rows) of the shard's ``row``-th block; fused
        probabilities and tails come back as float32 (from float16), rows padded with id −1 to
        the stored width."""
        group = int(np.searchsorted(self.starts, row, side="right")) - 1
        if self._group is None or self._group[0] != group:
            table = self.file.read_row_group(group)
            columns = {name: table.column(name).combine_chunks() for name in SCHEMA.names}
            self._group = (group, columns)
        return _row(self._group[1], row - int(self.starts[group]), self.teachers)

    def close(self) -> None:
        self.file.close()


def read_shard(path: Path, teachers: Sequence[str]) -> dict[int, tuple[np.ndarray, FusedBlock]]:
    """{block index: ``ShardFile.block``'s pair} for every block of a shard."""
    table = pq.read_table(path)
    columns = {name: table.column(name).combine_chunks() for name in SCHEMA.names}
    indices = columns["block"].to_numpy()
    return {int(i): _row(columns, b, tuple(teachers)) for b, i in enumerate(indices)}


def _values(column: pa.ListArray, b: int) -> np.ndarray:
    return column[b].values.to_numpy(zero_copy_only=False)


def _row(columns: dict, b: int, teachers: tuple[str, ...]) -> tuple[np.ndarray, FusedBlock]:
    """Block ``b`` of a shard's columns as (input_ids, FusedBlock)."""
    input_ids = _values(columns["input_ids"], b).astype(np.int64)
    rows = columns["fused_ids"][b].values  # ListArray of n rows
    lengths = np.diff(rows.offsets.to_numpy())
    width = int(columns["width"][b].as_py())
    n = len(lengths)
    slot = np.arange(width)[None, :] < lengths[:, None]  # [n, width]
    ids = np.full((n, width), -1, dtype=np.int32)
    probs = np.zeros((n, width), dtype=np.float32)
    ids[slot] = rows.flatten().to_numpy(zero_copy_only=False)
    probs[slot] = columns["fused_probs"][b].values.flatten().to_numpy(zero_copy_only=False)
    block = FusedBlock(
        target_ids=input_ids.astype(np.int32),
        ids=ids,
        probs=probs,
        tail=_values(columns["fused_tail"], b).astype(np.float32),
        chosen=_values(columns["chosen"], b).astype(np.int16),
        ce=_values(columns["ce"], b).astype(np.float32),
        coverage=_values(columns["coverage"], b).astype(np.float32),
        teachers=teachers,
    )
    return input_ids, block
