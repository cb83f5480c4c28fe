"""The judge's arithmetic (hand-worked) and the judged claim on made-up results."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fuseserve.experiment.config import ClaimConfig, load_experiment
from fuseserve.experiment.judge import completion_bytes, distinct_2, sampled_nll
from fuseserve.experiment.report import REFUTED, REPRODUCED, check_claims, row_summaries
from fuseserve.experiment.runner import Outcome, RunRecord
from fuseserve.wire.messages import FusedBlock


def test_distinct_2_counts_distinct_bigrams_over_all_completions():
    assert distinct_2([np.array([1, 2, 1, 2]), np.array([2, 1, 3])]) == pytest.approx(3 / 5)
    assert math.isnan(distinct_2([np.array([4])]))


def test_sampled_nll_reads_row_t_minus_1_and_the_tail_for_an_unlisted_token():
    ids = np.array([7, 8, 9, 5], dtype=np.int32)
    block = FusedBlock(
        target_ids=ids,
        ids=np.array([[8, 1], [9, 2], [3, 4], [-1, -1]], dtype=np.int32),
        probs=np.array([[0.5, 0.4], [0.25, 0.7], [0.6, 0.3], [0, 0]], dtype=np.float32),
        chosen=np.zeros(4, dtype=np.int16),
        ce=np.ones(1, dtype=np.float32),
        coverage=np.ones(1, dtype=np.float32),
        teachers=("t",),
        tail=np.array([0.1, 0.05, 0.1, 0.0], dtype=np.float32),
    )
    # prompt = 2 tokens: completion tokens 9 (row 1 lists it: 0.25) and 5 (row 2: tail 0.1)
    assert sampled_nll(block, 2, 4) == pytest.approx(-math.log(0.25) - math.log(0.1))


def test_completion_bytes_are_what_the_completion_adds(mistral_tok):
    prompt = np.array(mistral_tok("Hello", add_special_tokens=False)["input_ids"])
    completion = np.array(mistral_tok(" wörld", add_special_tokens=False)["input_ids"])
    assert completion_bytes(mistral_tok, prompt, completion) == len(" wörld".encode())


def outcome_with(judged_on: list[float], judged_off: list[float], held_on: float) -> Outcome:
    cfg = load_experiment(Path(__file__).parents[2] / "experiments" / "onpolicy.yaml")
    claim = ClaimConfig(kind="judged", run="on-rkl", than=("off-spans",), at_most=0.01, text="x")
    cfg = cfg.model_copy(update={"claims": (claim,), "runs": {"on-rkl": {}, "off-spans": {}}})
    runs = []
    for run, judged, held in (("on-rkl", judged_on, held_on), ("off-spans", judged_off, 1.0)):
        for seed, value in enumerate(judged):
            ood = [f"ood-{kind}" for kind in cfg.corpus.ood]
            final = dict.fromkeys([*cfg.corpus.domains, *ood], held)
            verdict = {"bpb": {"fused": value}, "distinct2": 0.9, "completion_len": 60.0}
            runs.append(RunRecord(run, seed, "k", "m", final, [], judged=verdict))
    return Outcome(cfg, {}, runs, None, 1.0, Path("."))


@pytest.mark.parametrize(
    ("on", "off", "held", "verdict"),
    [
        ([1.0, 1.01, 0.99], [1.2, 1.21, 1.19], 1.005, REPRODUCED),
        ([1.0, 1.01, 0.99], [1.2, 1.21, 1.19], 1.02, REFUTED),  # held-out BPB up 2%
        ([1.0, 1.3, 0.8], [1.2, 1.21, 1.19], 1.0, "same direction, not significant (within 2 std)"),
    ],
)
def test_the_judged_claim_needs_2_std_and_held_out_within_the_limit(on, off, held, verdict):
    outcome = outcome_with(on, off, held)
    (claim,) = check_claims(outcome, row_summaries(outcome))
    assert claim["verdict"] == verdict
    assert claim["pairs"][0]["heldout_change"] == pytest.approx(held - 1.0)
