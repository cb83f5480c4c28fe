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
    monkeypatch.chdir(tmp_path)  # the data is read once before training starts
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "some text"}\n')
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


def test_prefetch_depth_follows_the_blocks_a_step_consumes():
    fused = dict(BASE, aligner="h:1", lam=0.9)
    assert TrainConfig(**fused).fused_prefetch_depth() == 8
    cfg = TrainConfig(**fused, batch_size=4, grad_accum=4)
    assert cfg.blocks_per_step == 16 and cfg.fused_prefetch_depth() == 32
    assert TrainConfig(**fused, batch_size=2, grad_accum=2, prefetch_depth=4).prefetch_depth == 4
    with pytest.raises(ValueError, match="prefetch_depth: 3 cannot hold one step's 4 blocks"):
        TrainConfig(**fused, batch_size=2, grad_accum=2, prefetch_depth=3)


def test_cli_names_a_bad_scaling_flag(monkeypatch):
    monkeypatch.setattr("fuseserve.trainer.job.run_training", lambda cfg: None)
    for flags, field in (
        (["--parallel", "zero3"], "parallel"),
        (["--grad-accum", "0"], "grad_accum"),
        (["--mixed-precision", "fp8"], "mixed_precision"),
        (["--loss-chunk", "-1"], "loss_chunk"),
    ):
        args = build_parser().parse_args(["train", "--model", "m", "--data", "a", *flags])
        with pytest.raises(SettingsError, match=field):
            args.func(args)
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--grad-accum", "--parallel", "--activation-checkpointing", "--chat"):
        assert flag in help_text


def test_help_says_required_and_real_defaults_only():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_of = {a.dest: a.help for a in train._actions}
    assert help_of["model"].endswith("(required)")
    assert help_of["data"].endswith("(required)")
    assert help_of["block_size"].endswith("(default: 2048)")
    assert "default" not in help_of["export_dir"]  # unset means off: no "(default: None)"
    assert help_of["tokenizer"] == "target tokenizer spec (default: model's)"
    assert not any("PydanticUndefined" in (h or "") for h in help_of.values())
