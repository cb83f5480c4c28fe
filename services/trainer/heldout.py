"""Held-out bits per byte while training: when to measure, and the row it appends to metrics.

Covers reading the ``eval_data`` domains once, the steps a measurement is due at (every
``eval_every`` steps and the last), and scoring the model in eval mode (``evaluate``) into a
metrics row.

Leaves out: the BPB computation (``evaluate``), which ranks measure (``recipe``).
"""

from __future__ import annotations

import json
import logging

from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.data import read_documents

log = logging.getLogger(__name__)


class HeldOut:
    """Held-out bits per byte during training, appended to the metrics file.

    Rows look like ``{"step": 20, "blocks_seen": 160, "tokens_seen": 20480, "eval_bpb":
    {"code": 1.93, ...}}``; ``tokens_seen`` counts target tokens of the blocks trained on so far.
    """

    def __init__(self, domains: dict[str, list[str]], max_length: int, block_size: int) -> None:
        self.domains = domains
        self.max_length = max_length
        self.block_size = block_size

    @classmethod
    def load(cls, cfg: TrainConfig) -> HeldOut | None:
        if not cfg.eval_data:
            return None
        texts = {}
        for domain, paths in cfg.eval_domains().items():
            try:
                texts[domain] = read_documents(paths)
            except (FileNotFoundError, ValueError) as exc:
                raise ValueError(f"eval_data: domain {domain!r}: {exc}") from None
        return cls(texts, cfg.eval_max_length, cfg.block_size)

    @staticmethod
    def due(done: int, cfg: TrainConfig) -> bool:
        return done == cfg.max_steps or bool(cfg.eval_every and done % cfg.eval_every == 0)

    def record(self, model, tokenizer, step: int, blocks_seen: int, metrics_file) -> dict:
        """Score every domain (the model left in eval mode) and append the row."""
        from fuseserve.trainer.evaluate import bits_per_byte
        from fuseserve.trainer.metrics_log import append_row

        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.eval()
        bpb = {
            domain: bits_per_byte(unwrapped, tokenizer, texts, self.max_length).value
            for domain, texts in self.domains.items()
        }
        row = {
            "step": step,
            "blocks_seen": blocks_seen,
            "tokens_seen": blocks_seen * self.block_size,
            "eval_bpb": bpb,
        }
        log.info("held-out BPB at step %d: %s", step, json.dumps(bpb))
        append_row(metrics_file, row)
        return row
