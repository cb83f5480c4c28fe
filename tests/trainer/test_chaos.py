"""A fused Ray Train run through a teacher outage, an aligner outage and a Redis restart, against
real processes (``bench/bench_chaos.py`` with short outages): exit status 0 and weights
bit-identical to the undisturbed run with the same seed; the waits are in the metrics."""

from __future__ import annotations

import argparse

import pytest

from bench.bench_chaos import run_chaos

pytestmark = pytest.mark.slow


def test_a_fused_run_waits_out_outages_and_ends_with_the_same_weights(tmp_path):
    args = argparse.Namespace(teacher_outage=6.0, aligner_outage=4.0, steps=24)
    result = run_chaos(tmp_path, args, log=lambda message: None)
    assert (result["calm_rc"], result["chaos_rc"]) == (0, 0), result
    assert result["identical"], result
    # the run stood still through most of the outages (a few prefetched steps hide the start)
    assert result["waited_s"] >= 3.0, result
