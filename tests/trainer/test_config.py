"""Trainer settings: the λ schedule, warm-up, held-out data and fusion choices from the CLI."""

from __future__ import annotations

import pytest

from fuseserve.cli import SettingsError, build_parser
from fuseserve.trainer.config import TrainConfig

BASE = {"model": "m", "data": ["d.jsonl"]}


def test_lam_end_zero_trains_with_fusion():
    """λ from 1 to 0 is a fused run (0.0 used to be read as "unset")."""
    cfg = TrainConfig(**BASE, aligner="127.0.0.1:1", lam=1.0, lam_end=0.0, max_steps=5)
    assert cfg.fused
    assert [cfg.lam_at(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="aligner"):
        TrainConfig(**BASE, lam=1.0, lam_end=0.0)


def test_short_runs_still_warm_up():
    assert TrainConfig(**BASE, lam=1.0, max_steps=100, warmup_ratio=0.008).warmup_steps() == 1
    assert TrainConfig(**BASE, lam=1.0, max_steps=1000, warmup_ratio=0.008).warmup_steps() == 8
    assert TrainConfig(**BASE, lam=1.0, max_steps=100, warmup_ratio=0.0).warmup_steps() == 0


def test_eval_data_is_checked_and_split_by_domain():
    cfg = TrainConfig(**BASE, lam=1.0, eval_data=["code=a.jsonl,b.jsonl", "prose=c.jsonl"])
    assert cfg.eval_domains() == {"code": ["a.jsonl", "b.jsonl"], "prose": ["c.jsonl"]}
    with pytest.raises(ValueError, match="eval_data"):
        TrainConfig(**BASE, lam=1.0, eval_data=["no-domain.jsonl"])


def test_cli_flags_for_eval_data_and_fusion_choices(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("fuseserve.trainer.job.run_training", fake_run)
    args = build_parser().parse_args(
        [
            "train", "--model", "m", "--data", "a.jsonl", "--aligner", "h:1",
            "--eval-data", "code=a.jsonl,b.jsonl,prose=c.jsonl", "--eval-every", "10",
            "--teachers", "x,y", "--preset", "spans", "--fusion-options", '{"tail": false}',
        ]
    )  # fmt: skip
    with pytest.raises(SystemExit):
        args.func(args)
    cfg = seen["cfg"]
    assert cfg.eval_data == ["code=a.jsonl,b.jsonl", "prose=c.jsonl"]
    assert cfg.teachers == ["x", "y"] and cfg.preset == "spans"
    assert cfg.fusion_options == {"tail": False} and cfg.eval_every == 10
    bad = ["train", "--model", "m", "--data", "a", "--fusion-options", "{"]
    bad_args = build_parser().parse_args(bad)
    with pytest.raises(SettingsError, match="fusion_options"):
        bad_args.func(bad_args)
