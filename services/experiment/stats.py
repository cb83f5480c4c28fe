"""Seeds and claims: mean ± std, the 2-std significance rule, token efficiency (Figure 2).

Pure functions on numbers; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample standard deviation (n − 1); 0 for one value
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}" if self.n > 1 else f"{self.mean:.4f}"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("values: nothing to summarise")
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return Summary(mean, math.sqrt(var), n)


def significantly_lower(a: Summary, b: Summary) -> bool:
    """``a`` is below ``b`` by more than twice the larger of the two standard deviations."""
    return b.mean - a.mean > 2 * max(a.std, b.std)


def tokens_to_reach(tokens: Sequence[float], bpb: Sequence[float], level: float) -> float | None:
    """Training tokens at which a BPB curve first reaches ``level`` (linear between evaluations),
    or None when it never does."""
    for i, (t, v) in enumerate(zip(tokens, bpb)):
        if v <= level:
            if i == 0:
                return float(t)
            t0, v0 = tokens[i - 1], bpb[i - 1]
            return float(t0 + (t - t0) * (v0 - level) / (v0 - v))
    return None


def token_efficiency(
    run_tokens: Sequence[float],
    run_bpb: Sequence[float],
    baseline_tokens: Sequence[float],
    baseline_bpb: Sequence[float],
) -> float | None:
    """Tokens ``run`` needs to reach ``baseline``'s final BPB, over the tokens ``baseline`` used
    (below 1: ``run`` is more token-efficient; None: it never gets there)."""
    reached = tokens_to_reach(run_tokens, run_bpb, baseline_bpb[-1])
    return None if reached is None else reached / baseline_tokens[-1]
