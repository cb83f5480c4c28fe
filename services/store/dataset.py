"""A fused store as a Hugging Face ``datasets.Dataset``: one row per block, in corpus order.

The shards are plain parquet files, so ``datasets`` reads them without fuseserve::

    from datasets import load_dataset
    ds = load_dataset("parquet", data_files="STORE/shards/*.parquet", split="train")
    row = ds[0]   # block, input_ids [n], fused_ids [n][w_i], fused_probs [n][w_i] (float16),
                  # fused_tail [n], chosen [n], loss_mask [n] or None, width, ce [K], coverage [K]

(the shard names sort in block order). ``load_store_dataset`` does the same for a store whose
manifest says it is finished, with the files listed from the manifest rather than a glob.

Leaves out: turning rows into training tensors (``fuseserve.integrations.hf``), writing stores.
"""

from __future__ import annotations

from pathlib import Path

from fuseserve.store.manifest import StoreMismatch, read_manifest


def store_data_files(folder: str | Path) -> list[str]:
    """The shard files of a finished store, in block order."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.complete or len(manifest.shards) != manifest.num_shards:
        raise StoreMismatch(f"store: {folder} is unfinished; run its fuseserve export again")
    return [str(folder / s.file) for s in sorted(manifest.shards, key=lambda s: s.index)]


def load_store_dataset(folder: str | Path):
    """The store as a ``datasets.Dataset`` (row b = block b; columns as in ``shards``)."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files={"train": store_data_files(folder)}, split="train")
