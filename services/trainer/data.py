"""Training data: documents from files -> packed blocks of target tokens with their exact text.

Covers reading plain text (one document per file), jsonl (a ``text`` field per line), parquet (a
``text`` column) and datasets saved with ``datasets.save_to_disk``; packing documents into one
stream (joined by a separator) and cutting it into blocks of ``block_size`` target tokens; each
block's text is exactly the characters its tokens cover, so every teacher scores the same
characters; a deterministic epoch order from a seed, sharded across workers by rank.

The ids a block trains on are the target tokenizer's ids *of the block text* (tokenised on its
own, no special tokens, cut to ``block_size``): the same ids the aligner computes, so the trainer
can check the aligner's answer token by token.

Leaves out: fused targets (``prefetch``) and the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


@dataclass(frozen=True)
class Block:
    """One training block: its index in the corpus order, its text and its target ids [n]."""

    index: int
    text: str
    ids: np.ndarray


def read_documents(paths: Sequence[str | Path], field: str = "text") -> list[str]:
    """Documents from files or directories (text, .jsonl, .parquet, or a save_to_disk dataset)."""
    docs: list[str] = []
    for spec in paths:
        path = Path(spec)
        if path.is_dir() and (path / "dataset_info.json").exists():
            from datasets import load_from_disk

            docs.extend(str(t) for t in load_from_disk(str(path))[field] if t)
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    docs.extend(read_documents([child], field))
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if field not in record:
                            raise ValueError(f"{path}:{n}: no {field!r} field")
                        docs.append(str(record[field]))
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            docs.extend(str(t) for t in pq.read_table(path, columns=[field])[field].to_pylist())
        elif path.suffix in TEXT_SUFFIXES or path.suffix == "":
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
        elif not path.exists():
            raise FileNotFoundError(f"data: no such file or directory {spec!r}")
    return [d for d in docs if d.strip()]


def pack_blocks(
    tokenizer, documents: Iterable[str], block_size: int, separator: str = "\n\n"
) -> list[Block]:
    """Cut the packed document stream into blocks of ``block_size`` tokens (the tail is dropped).

    Documents are tokenised one by one (offsets shifted into the stream), so memory stays linear.
    """
    stream_parts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    position = 0
    for doc in documents:
        text = doc + separator
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        for s, e in enc["offset_mapping"]:
            if e > s:
                starts.append(position + s)
                ends.append(position + e)
        stream_parts.append(text)
        position += len(text)
    stream = "".join(stream_parts)
    blocks = []
    for b in range(len(starts) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size - 1
        text = stream[starts[lo] : ends[hi]]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:block_size]
        if len(ids) >= 2:
            blocks.append(Block(len(blocks), text, np.asarray(ids, dtype=np.int64)))
    return blocks


def epoch_order(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of block indices, the same for every worker."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def worker_schedule(
    num_blocks: int, seed: int, rank: int, world: int, batch_size: int, start_step: int = 0
):
    """Yield (step, epoch, [block indices]) for this worker from ``start_step`` on, forever.

    Every step takes ``batch_size * world`` consecutive blocks of the epoch order; worker ``rank``
    gets its slice. Epochs end where a full global batch no longer fits.
    """
    global_batch = batch_size * world
    steps_per_epoch = num_blocks // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"data: {num_blocks} blocks cannot fill one global batch of {global_batch} "
            f"(batch_size {batch_size} x {world} workers)"
        )
    step = start_step
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        order = epoch_order(num_blocks, seed, epoch)
        base = within * global_batch + rank * batch_size
        yield step, epoch, order[base : base + batch_size].tolist()
        step += 1
