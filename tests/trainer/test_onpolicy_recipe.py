"""On-policy steps in the recipe, in one process: which steps sample, what they train on, the
metrics, and resuming (the same prompts and the same samples after a restart).

The fused-target stream is a stand-in here (a test of the recipe's bookkeeping, not of fusion):
it answers every fed sample with rows that list the actual next token; the end-to-end test with
a real aligner and real teachers is ``test_onpolicy_e2e``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.prefetch import FED, PrefetchStats
from fuseserve.trainer.recipe import FusionRecipe
from fuseserve.wire.messages import FusedBlock
from tests.trainer.conftest import read_metrics, small_run
from tests.trainer.test_recipe import OneProcess


class JudgingStandIn:
    """Answers fed samples in order: row i lists ids[i + 1] (0.6) and id 3 (0.3), tail 0.1."""

    def __init__(self, order) -> None:
        self.order = list(order)
        self.fed: list = []
        self.stats = PrefetchStats()

    def feed(self, blocks) -> None:
        self.fed.extend(blocks)

    def get(self, expected, fed=False):
        assert fed and self.order.pop(0) == FED, "the recipe asked out of order"
        n = len(expected.ids)
        ids = np.full((n, 2), -1, dtype=np.int32)
        ids[: n - 1, 0] = expected.ids[1:]
        ids[: n - 1, 1] = np.where(expected.ids[1:] == 3, 4, 3)
        probs = np.where(ids >= 0, np.array([0.6, 0.3], dtype=np.float32), 0.0)
        return FusedBlock(
            target_ids=expected.ids.astype(np.int32),
            ids=ids,
            probs=probs.astype(np.float32),
            chosen=np.zeros(n, dtype=np.int16),
            ce=np.ones(1, dtype=np.float32),
            coverage=np.ones(1, dtype=np.float32),
            teachers=("t",),
            tail=np.where(np.arange(n) < n - 1, 0.1, 0.0).astype(np.float32),
        )

    def close(self) -> None:
        pass


class StandInRecipe(FusionRecipe):
    def open_stream(self):
        return JudgingStandIn(self.stream_order())


def onpolicy_settings(tiny_dirs, corpus, tmp_path, **extra) -> dict:
    settings = small_run(
        tiny_dirs, corpus, tmp_path, block_size=24, batch_size=2, grad_accum=2, lam=1.0
    )
    settings.update(
        aligner="stand-in:0",
        on_policy=0.5,
        prompt_tokens=8,
        max_new_tokens=6,
        metrics_file=str(tmp_path / "metrics.jsonl"),
        checkpoint_every=2,
        name="onpolicy",
    )
    return {**settings, **extra}


def make(settings: dict) -> StandInRecipe:
    cfg = TrainConfig(**settings)
    return StandInRecipe(cfg, OneProcess(cfg))


def test_steps_alternate_and_on_policy_steps_train_on_completions(tiny_dirs, corpus, tmp_path):
    run = make(onpolicy_settings(tiny_dirs, corpus, tmp_path, max_steps=4))
    run.run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["onpolicy"] for r in rows] == [False, True, False, True]
    assert [r["onpolicy_share"] for r in rows] == [0.0, 0.5, 1 / 3, 0.5]
    on = [r for r in rows if r["onpolicy"]]
    assert all(1 <= r["completion_len_mean"] <= 6 for r in on)
    assert all(0 < r["generation_fraction"] < 1 for r in on)
    # rows list the actual next token with 0.6: teacher-judged NLL is −ln 0.6 exactly
    assert all(r["teacher_nll"] == pytest.approx(-math.log(0.6), rel=1e-5) for r in on)
    assert all(math.isfinite(r["loss"]) and r["onpolicy_divergence"] >= 0 for r in on)
    fed = run.stream.fed
    assert len(fed) == 2 * 4  # two on-policy steps of batch_size x grad_accum samples
    for sample in fed:
        prompt = int((~sample.loss_mask).sum())
        assert prompt == 8 and sample.loss_mask[prompt:].all()
        assert 1 <= len(sample.ids) - prompt <= 6


def test_the_loss_is_zero_gradient_on_prompt_tokens(tiny_dirs, corpus, tmp_path):
    """Changing the logits at prompt positions does not change the on-policy loss."""
    settings = onpolicy_settings(tiny_dirs, corpus, tmp_path, max_steps=2, on_policy=1.0)
    run = make({**settings, "generation_batch": 1})  # four generate calls, two micro-batches
    run.setup()
    rollout = run.onpolicy.rollout(run.model, 0, run.stream, run.worker.device)
    assert len(rollout.samples) == 4 and len(rollout.micro_batches) == 2
    batch = rollout.micro_batches[0]
    ids, mask, labels = batch[0], batch[1], batch[2]
    logits = run.model(input_ids=ids, attention_mask=mask).logits.detach().requires_grad_(True)
    loss, _, _ = run.onpolicy.loss_fn()(logits, batch, (int((labels[:, 1:] != -100).sum()),) * 2)
    loss.backward()
    rows_with_loss = torch.zeros(labels.shape, dtype=torch.bool)
    rows_with_loss[:, :-1] = labels[:, 1:] != -100
    assert logits.grad[~rows_with_loss].abs().max() == 0
    assert logits.grad[rows_with_loss].abs().sum(-1).min() > 0


@pytest.mark.parametrize("loss", ["jsd", "sampled_rkl"])
def test_a_resumed_run_samples_the_same_and_ends_with_the_same_weights(
    tiny_dirs, corpus, tmp_path, loss
):
    base = onpolicy_settings(tiny_dirs, corpus, tmp_path, onpolicy_loss=loss)
    whole = make({**base, "name": "whole", "max_steps": 4})
    whole.run()
    first = make({**base, "name": "cut", "max_steps": 4})
    first.setup()  # stopped after the checkpoint of step 2, as a killed run would be
    first.model.train()
    for step in range(2):
        first.finish_step(first.train_step(step))
    first.stream.close()
    second = make({**base, "name": "cut", "max_steps": 4})
    second.run()
    assert second.start_step == 2
    assert [s.ids.tolist() for s in second.stream.fed] == [
        s.ids.tolist() for s in whole.stream.fed[4:]
    ]
    for name, weight in whole.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], weight, atol=1e-6, rtol=1e-5)


def test_resuming_with_another_share_is_refused(tiny_dirs, corpus, tmp_path):
    base = onpolicy_settings(tiny_dirs, corpus, tmp_path, max_steps=2)
    make(base).run()
    with pytest.raises(RuntimeError, match="on_policy"):
        make({**base, "on_policy": 1.0, "max_steps": 3}).setup()


def test_on_policy_settings_name_the_bad_field(tiny_dirs, corpus, tmp_path):
    base = small_run(tiny_dirs, corpus, tmp_path, lam=1.0)
    with pytest.raises(ValueError, match="on_policy"):
        TrainConfig(**base, on_policy=0.5)
    with pytest.raises(ValueError, match="prompts"):
        TrainConfig(**base, aligner="a:1", on_policy=0.5, prompts=str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="prompt_tokens"):
        TrainConfig(**base, aligner="a:1", on_policy=0.5, block_size=16, prompt_tokens=16)
    with pytest.raises(ValueError, match="jsd_beta"):
        TrainConfig(**base, jsd_beta=1.5)
