"""Which fusion loss a run trains with: the name a setting, a flag and the loss code share.

Covers the ``FusionLoss`` choice alone, with no torch import, so settings and the command line
can name it without loading the loss code.

Leaves out: computing either loss (``loss``).
"""

from __future__ import annotations

from enum import StrEnum


class FusionLoss(StrEnum):
    """Soft cross-entropy −Σ P log Q (the paper's choice) or KL(P ‖ Q)."""

    SOFT_CE = "soft_ce"
    KL = "kl"
