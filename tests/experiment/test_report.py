"""The claims checker on hand-made outcomes: the 2-std rule, and no verdict below 3 seeds."""

from __future__ import annotations

from pathlib import Path

from fuseserve.experiment.config import load_experiment
from fuseserve.experiment.report import check_claims, row_summaries
from fuseserve.experiment.runner import Outcome, RunRecord

ROOT = Path(__file__).resolve().parents[2]


def outcome(seeds: list[int], fused: list[float], clm: list[float]) -> Outcome:
    cfg = load_experiment(ROOT / "experiments" / "table7.yaml")
    cfg = cfg.model_copy(update={"seeds": tuple(seeds)})
    claim = [c for c in cfg.claims if c.run == "fused-spans" and c.than == ("clm-only",)]
    order = [c for c in cfg.claims if c.kind == "order"]
    cfg = cfg.model_copy(update={"claims": claim + order})
    runs = []
    for name, values in (("fused-spans", fused), ("clm-only", clm)):
        for seed, v in zip(seeds, values):
            final = {d: v for d in cfg.corpus.domains}
            runs.append(RunRecord(name, seed, "k", "", final, []))
    baselines = {
        row: {d: v for d in cfg.corpus.domains}
        for row, v in (("base", 2.4), ("merge", 2.2), ("ensemble", 2.3))
    }
    return Outcome(cfg, baselines, runs, None, 0.0, Path("."))


def verdicts(o: Outcome) -> list[str]:
    return [c["verdict"] for c in check_claims(o, row_summaries(o))]


def test_one_seed_is_untested_not_reproduced():
    # fused 2.10 vs CLM 2.20 with one seed: std 0, so any gap would pass the 2-std rule
    better, order = check_claims(o := outcome([0], [2.10], [2.20]), row_summaries(o))
    assert better["verdict"] == "untested (1 seed)"
    assert better["pairs"][0]["diff"] == 2.20 - 2.10
    # fused < merge involves a run: untested; merge < ensemble < base are baselines: judged
    assert [p["verdict"] for p in order["pairs"]] == [
        "untested (1 seed)",
        "reproduced",
        "reproduced",
    ]
    assert order["verdict"] == "untested (1 seed)"
    assert verdicts(outcome([0, 1], [2.10, 2.11], [2.20, 2.21]))[0] == "untested (2 seeds)"


def test_three_seeds_apply_the_two_std_rule():
    # means 2.10 and 2.20, std 0.01 each: 0.10 > 2 x 0.01
    assert verdicts(outcome([0, 1, 2], [2.09, 2.10, 2.11], [2.19, 2.20, 2.21]))[0] == "reproduced"
    # std 0.06: 0.10 < 0.12
    spread = verdicts(outcome([0, 1, 2], [2.04, 2.10, 2.16], [2.19, 2.20, 2.21]))[0]
    assert spread.startswith("same direction")
    # a refuted baseline pair wins over a pending one
    assert verdicts(outcome([0], [2.10], [2.20]))[1] == "untested (1 seed)"
    worse = outcome([0], [2.10], [2.20])
    worse.baselines["merge"] = {d: 2.35 for d in worse.config.corpus.domains}
    assert verdicts(worse)[1] == "NOT reproduced"
