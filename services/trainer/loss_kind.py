"""Which losses a run trains with: the names a setting, a flag and the loss code share.

Covers the ``FusionLoss`` choice (off-policy steps) and the ``OnPolicyLoss`` choice (on-policy
steps) alone, with no torch import, so settings and the command line can name them without
loading the loss code.

Leaves out: computing either loss (``loss``).
"""

from __future__ import annotations

from enum import StrEnum


class FusionLoss(StrEnum):
    """Soft cross-entropy −Σ P log Q (the paper's choice) or KL(P ‖ Q)."""

    SOFT_CE = "soft_ce"
    KL = "kl"


class OnPolicyLoss(StrEnum):
    """On-policy steps: generalized JSD(β) over the fused support (``jsd``; β = 1 is the reverse
    KL) or the sampled-token reverse KL with the fused teachers' advantage (``sampled_rkl``)."""

    JSD = "jsd"
    SAMPLED_RKL = "sampled_rkl"
