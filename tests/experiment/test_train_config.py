"""A training run's settings travel as a config file that ``fuseserve train --config`` reads."""

from __future__ import annotations

from fuseserve.config_file import load_settings_file
from fuseserve.experiment.config import TrainingConfig
from fuseserve.experiment.runner import fusion_values, train_env, write_train_config
from fuseserve.trainer.config import TrainConfig


def test_a_fused_on_policy_run_is_one_file_the_trainer_validates(tmp_path):
    settings = TrainingConfig(
        lam=0.6, lam_end=0.9, k=7, preset="spans", fusion_loss="kl",
        options={"temperature": 1.5}, on_policy=0.25, onpolicy_loss="sampled_rkl", top_p=0.9,
    )  # fmt: skip
    values = {"model": "shipped:smollm2", "data": [str(tmp_path / "a.txt")], "lr": 2e-4}
    values.update(fusion_values(settings, ["spm", "bpe"], "127.0.0.1:50061"))
    path = write_train_config(tmp_path / "train.yaml", values)
    cfg = load_settings_file(TrainConfig, str(path))
    assert (cfg.aligner, cfg.teachers) == ("127.0.0.1:50061", ["spm", "bpe"])
    assert (cfg.k, cfg.preset) == (7, "spans")
    assert (cfg.lam, cfg.lam_end, cfg.fusion_loss, cfg.lr) == (0.6, 0.9, "kl", 2e-4)
    assert cfg.fusion_options == {"temperature": 1.5} and cfg.top_p == 0.9
    assert (cfg.on_policy, cfg.onpolicy_loss) == (0.25, "sampled_rkl")


def test_a_clm_only_run_and_no_teacher_subset(tmp_path):
    assert fusion_values(TrainingConfig(lam=1.0), ["spm"], None) == {"lam": 1.0}
    fused = fusion_values(TrainingConfig(lam=0.5), [], "127.0.0.1:1")
    assert "teachers" not in fused and "on_policy" not in fused


def test_the_runs_settings_win_over_the_environment_as_flags_did(tmp_path):
    path = write_train_config(tmp_path / "train.yaml", {"lr": 0.5, "max_steps": 3})
    env = {"FUSESERVE_TRAIN_LR": "9", "fuseserve_train_max_steps": "9", "FUSESERVE_TRAIN_SEED": "4"}
    assert train_env(path, env) == {"FUSESERVE_TRAIN_SEED": "4"}
