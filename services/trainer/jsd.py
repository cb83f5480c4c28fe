"""Generalized Jensen-Shannon divergence JSD(β) between the fused distribution and the target's,
over the fused support with a tail bucket (the on-policy loss of GKD, sparse).

A fused row lists W ids with probabilities P_w and leaves the tail mass P_tail on every other id.
Both distributions are read on the same W + 1 outcomes: the listed ids and one *rest* bucket.
The target's Q_w = softmax(z / T)[id_w] and Q_rest = 1 − Σ_w Q_w (at least 0); the fused P_w and
P_rest = P_tail (0 when the row keeps no tail). On these outcomes

    β = 0:      KL(P ‖ Q)                               (forward KL, mode covering)
    β = 1:      KL(Q ‖ P)                               (reverse KL, mode seeking)
    0 < β < 1:  β·KL(P ‖ M) + (1 − β)·KL(Q ‖ M),  M = β·P + (1 − β)·Q

This is the convention of TRL's ``generalized_jsd_loss`` (the ends are the two KLs, not the
limits of the mixture form, which tends to 0 at both ends). Inside the logs both P and Q are
floored at ``P_FLOOR``: where P is 0 but Q is not (a listed id whose f16 probability underflowed;
the rest bucket of a row without tail) the reverse KL stays finite and pushes that mass towards
P's support; where Q_rest is 0 the forward KL's tail term stays finite.

Temperature: T divides the target's logits only; the fused P is what the aligner sends (its own
temperature is the aligner's ``temperature`` fusion option).

Shapes: logits [B, L, V]; fused_ids [B, L, W] int64 (−1 = padding; a row of −1 = no target);
fused_probs [B, L, W]; fused_tail [B, L] or None. Row i predicts token i + 1, as the logits do.
The result is the sum over rows with a target divided by ``denominator`` (their count when None).

Leaves out: the gathering of log Q and its gradient (``sparse_logprobs``); which rows carry a
target (the caller masks them: on-policy steps keep completion rows only).
"""

from __future__ import annotations

import torch

from fuseserve.trainer.sparse_logprobs import sparse_log_probs

P_FLOOR = 1e-8  # floor of P and Q inside their logs (only where one is 0)


def bucket_distributions(
    log_q_listed: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_probs: torch.Tensor,
    fused_tail: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, Q, support) on the W + 1 outcomes [..., W + 1]: listed ids, then the rest bucket."""
    valid = fused_ids >= 0
    zero = torch.zeros((), dtype=log_q_listed.dtype, device=log_q_listed.device)
    q = torch.where(valid, log_q_listed.exp(), zero)
    q_rest = (1.0 - q.sum(-1, keepdim=True)).clamp(min=0.0)
    p = torch.where(valid, fused_probs.to(q.dtype), zero)
    if fused_tail is None:
        p_rest = torch.zeros_like(q_rest)
    else:
        p_rest = fused_tail.to(q.dtype)[..., None].clamp(min=0.0)
    has_target = valid.any(-1, keepdim=True)
    support = torch.cat([valid, has_target], -1)
    return torch.cat([p, p_rest], -1), torch.cat([q, q_rest], -1), support


def _kl_terms(a: torch.Tensor, b: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """a·(log a − log b) per outcome, 0 where a = 0 or off the support; b floored."""
    log_a = torch.log(a.clamp(min=P_FLOOR))
    log_b = torch.log(b.clamp(min=P_FLOOR))
    return torch.where(support & (a > 0), a * (log_a - log_b), 0.0)


def jsd_divergence(p: torch.Tensor, q: torch.Tensor, support: torch.Tensor, beta: float):
    """JSD(β) per row [...] from bucketed distributions p, q [..., W + 1]."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd_beta: must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl_terms(p, q, support).sum(-1)
    if beta == 1.0:
        return _kl_terms(q, p, support).sum(-1)
    m = beta * p + (1.0 - beta) * q
    return (beta * _kl_terms(p, m, support) + (1.0 - beta) * _kl_terms(q, m, support)).sum(-1)


def jsd_loss(
    logits: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_probs: torch.Tensor,
    fused_tail: torch.Tensor | None = None,
    beta: float = 1.0,
    temperature: float = 1.0,
    denominator: float | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Σ over rows with a target of JSD(β)(P ‖ Q) on the bucketed support, / ``denominator``."""
    log_q = sparse_log_probs(logits, fused_ids, temperature, chunk)
    p, q, support = bucket_distributions(log_q, fused_ids, fused_probs, fused_tail)
    per_row = jsd_divergence(p, q, support, beta)
    has_target = (fused_ids >= 0).any(-1)
    total = (per_row * has_target).sum()
    if denominator is None:
        return total / has_target.sum().clamp(min=1)
    return total / max(float(denominator), 1.0)
