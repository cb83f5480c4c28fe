"""``fuseserve.integrations.hf``: FusionTrainer (transformers.Trainer) against our recipe on the
same blocks, and the collator's three sources (store, aligner stream, store rows via datasets)."""

from __future__ import annotations

import math

import pytest
import torch

from fuseserve.integrations.hf import (
    BlockExamples,
    FusedTargetsCollator,
    FusionTrainer,
    training_order,
)
from fuseserve.trainer.config import TrainConfig
from tests.store.test_store import blocks_of, run_recipe
from tests.store_fixtures import store_run


def hf_arguments(cfg: TrainConfig, out, **overrides):
    """TrainingArguments with the recipe's optimizer, schedule, clipping and batch."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(out),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        max_grad_norm=cfg.grad_clip,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps(),
        optim="adamw_torch",
        seed=cfg.seed,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=5,
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**values, **overrides})


def test_fusion_trainer_matches_the_recipe_for_20_steps(fused_store, tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    settings = store_run(tiny_dirs, fused_store, tmp_path / "recipe")
    rows, _ = run_recipe(settings)
    cfg, _, blocks = blocks_of(settings)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    order = training_order(len(blocks), cfg.seed, cfg.blocks_per_step, cfg.max_steps)
    trainer = FusionTrainer(
        model=model,
        args=hf_arguments(cfg, tmp_path / "hf"),
        train_dataset=BlockExamples(blocks, order),
        data_collator=FusedTargetsCollator.from_store(str(fused_store.folder)),
        lam=cfg.lam,
    )
    trainer.train()
    history = trainer.fusion_history
    assert [h["step"] for h in history] == list(range(1, 21))
    for ours, theirs in zip(rows, history):
        for key in ("loss", "clm_loss", "fusion_loss"):
            assert math.isclose(ours[key], theirs[key], abs_tol=1e-5), (ours["step"], key)
    assert history[-1]["loss"] < history[0]["loss"]
    logged = [log for log in trainer.state.log_history if "clm_loss" in log]
    assert logged and math.isclose(
        logged[0]["clm_loss"], sum(h["clm_loss"] for h in history[:5]) / 5, rel_tol=1e-6
    )


def test_the_collator_gives_the_same_batches_from_store_aligner_and_dataset_rows(
    fused_store, tiny_dirs, tmp_path
):
    from fuseserve.store.dataset import load_store_dataset

    cfg, _, blocks = blocks_of(store_run(tiny_dirs, fused_store, tmp_path))
    order = training_order(len(blocks), cfg.seed, 2, 3)
    examples = BlockExamples(blocks, order)
    rows = load_store_dataset(fused_store.folder)
    store = FusedTargetsCollator.from_store(str(fused_store.folder))
    online = FusedTargetsCollator.from_aligner(
        fused_store.aligner, blocks, order, preset="spans", depth=4
    )
    from_rows = FusedTargetsCollator()
    try:
        for start in range(0, len(order), 2):
            batch = [examples[i] for i in (start, start + 1)]
            want = store(batch)
            got_online = online(batch)
            got_rows = from_rows([rows[order[i]] for i in (start, start + 1)])
            for key, tensor in want.items():
                assert torch.equal(tensor, got_online[key]), key
                assert torch.equal(tensor, got_rows[key]), key
    finally:
        online.close()
        store.close()


def test_fusion_trainer_refuses_arguments_the_collator_cannot_work_with(
    fused_store, tiny_dirs, tmp_path
):
    from transformers import AutoModelForCausalLM

    cfg, _, blocks = blocks_of(store_run(tiny_dirs, fused_store, tmp_path))
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    collator = FusedTargetsCollator.from_store(str(fused_store.folder))
    with pytest.raises(ValueError, match="remove_unused_columns"):
        FusionTrainer(
            model=model,
            args=hf_arguments(cfg, tmp_path, remove_unused_columns=True),
            train_dataset=BlockExamples(blocks, range(4)),
            data_collator=collator,
        )
    online = FusedTargetsCollator(collator.source, sequential=True)
    with pytest.raises(ValueError, match="train_sampling_strategy"):
        FusionTrainer(
            model=model,
            args=hf_arguments(cfg, tmp_path, train_sampling_strategy="random"),
            train_dataset=BlockExamples(blocks, range(4)),
            data_collator=online,
        )
