"""Losses of FuseLLM training: causal LM, and fusion against a sparse fused distribution.

Covers ``L = λ·L_CLM + (1−λ)·L_fusion`` where L_fusion is the soft cross-entropy (the paper's
choice) or the KL divergence between the fused distribution P (sparse: W ids and probabilities per
position) and the target model's distribution Q = softmax(logits / T). Q is read only at P's ids:
log Q(id) = logits[id] / T − logsumexp(logits / T), so no dense target of size
batch x length x vocab is ever built; the only vocab-sized tensors are the logits themselves and
what logsumexp / cross-entropy need for their own gradients.

Tail mass: a fused row may leave mass P_tail on no listed id (the teacher's probability outside
its top-k); that mass asks the target to keep the same mass off the listed ids, so the fusion
term is −Σ_w P_w log Q(id_w) − P_tail log(1 − Σ_w Q(id_w)) (ids of a row are distinct). With
P_tail = 0 this is the plain soft cross-entropy of a renormalised top-k.

Shapes: logits [B, L, V]; labels / input_ids [B, L] (−100 = ignore); fused_ids [B, L, W] int64
(−1 = padding); fused_probs [B, L, W]; fused_tail [B, L] (or None: no tail); row i of a fused
block predicts token i+1 (the same convention as the logits).

Leaves out: where P comes from (``prefetch``), schedules of λ (``config``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuseserve.trainer.config import FusionLoss


def clm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits[:, i] predicts labels[:, i + 1] (−100 ignored)."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted.float(), target, ignore_index=-100)


MIN_REST = 1e-6  # floor of 1 − Σ_listed Q in the tail term (its log stays finite)


def fusion_loss(
    logits: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_probs: torch.Tensor,
    kind: FusionLoss = FusionLoss.SOFT_CE,
    temperature: float = 1.0,
    fused_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over positions that carry a fused distribution of −Σ P log Q − P_tail log(1 − ΣQ)
    (plus Σ P log P + P_tail log P_tail for KL)."""
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [B, L, 1]
    return _sparse_term(scaled, lse, fused_ids, fused_probs, kind, fused_tail)


def combined_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor | None,
    fused_probs: torch.Tensor | None,
    lam: float,
    kind: FusionLoss = FusionLoss.SOFT_CE,
    temperature: float = 1.0,
    fused_tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, clm, fusion): total = lam * clm + (1 - lam) * fusion (fusion 0 when lam == 1).

    At T = 1 both terms share one logsumexp over the vocabulary, so the fused step costs about
    what a CLM step costs (plus gathers of width W).
    """
    if lam >= 1.0 or fused_ids is None or fused_probs is None:
        clm = clm_loss(logits, labels)
        return clm, clm, torch.zeros((), device=logits.device)
    if temperature != 1.0:
        clm = clm_loss(logits, labels)
        fusion = fusion_loss(logits, fused_ids, fused_probs, kind, temperature, fused_tail)
        return lam * clm + (1.0 - lam) * fusion, clm, fusion
    if fused_tail is None:
        fused_tail = torch.zeros(fused_ids.shape[:-1], device=logits.device)
    return _SharedSoftmaxLoss.apply(
        logits, labels, fused_ids, fused_probs, fused_tail, lam, FusionLoss(kind)
    )


class _SharedSoftmaxLoss(torch.autograd.Function):
    """λ·CLM + (1−λ)·fusion at T = 1 with one softmax and one vocab-sized buffer.

    Both terms are weighted sums of (lse − z[id]) per position, so with weights a_i (CLM,
    position i predicts label i+1) and b_i·P_iw (fusion) the gradient is
    ∂L/∂z_i = (a_i + b_i·ΣP_i)·softmax(z_i) − a_i·onehot(label) − b_i·Σ_w P_iw·onehot(id_w).
    The tail term −b_i·P_tail·log R_i, with R_i = 1 − Σ_w Q_iw the target's mass off the listed
    ids, adds −b_i·P_tail·(S_i/R_i)·Q_iv for an unlisted v and +b_i·P_tail·Q_iw for a listed id
    (S_i = Σ_w Q_iw): a change of the softmax scale plus a scatter at the listed ids.
    Forward keeps only lse [B, L] and the gathered logits; backward writes the gradient in place
    of one softmax buffer (no gather/scatter of a second dense tensor, no dense target).
    """

    @staticmethod
    def forward(ctx, logits, labels, fused_ids, fused_probs, fused_tail, lam, kind):
        scores = logits.detach()
        lse = torch.empty(scores.shape[:-1], dtype=torch.float32, device=scores.device)
        for r in range(scores.shape[0]):  # one row at a time bounds logsumexp's temporaries
            lse[r] = torch.logsumexp(scores[r].float(), dim=-1)
        nxt = torch.full_like(labels, -100)
        nxt[:, :-1] = labels[:, 1:]
        has_label = nxt != -100
        n_label = has_label.sum().clamp(min=1)
        picked = scores.gather(-1, nxt.clamp(min=0)[..., None])[..., 0].float()
        clm = ((lse - picked) * has_label).sum() / n_label
        valid = fused_ids >= 0
        ids = fused_ids.clamp(min=0)
        p = torch.where(valid, fused_probs.float(), torch.zeros((), device=scores.device))
        has_target = valid.any(-1)
        n_target = has_target.sum().clamp(min=1)
        log_q = scores.gather(-1, ids).float() - lse[..., None]
        tail = torch.where(has_target, fused_tail.float(), torch.zeros((), device=scores.device))
        q_listed = torch.where(valid, log_q.exp(), torch.zeros((), device=scores.device))
        listed = q_listed.sum(-1)  # S [B, L]
        rest = (1.0 - listed).clamp(min=MIN_REST)  # R [B, L]
        per_position = (-p * log_q).sum(-1) - tail * torch.log(rest)
        if kind is FusionLoss.KL:
            per_position = per_position + _entropy_terms(p, tail)
        fusion = (per_position * has_target).sum() / n_target
        a = lam * has_label / n_label  # [B, L]
        b = (1.0 - lam) * has_target / n_target  # [B, L]
        # the tail term's gradient (zero where R sits at its floor, as the clamp's would be)
        active = (1.0 - listed) > MIN_REST
        unlisted_coef = torch.where(active, b * tail * listed / rest, 0.0)  # × Q, subtracted
        listed_coef = torch.where(active, b * tail / rest, 0.0)  # × Q at listed ids, added
        ctx.save_for_backward(logits, lse, nxt, ids, valid, p, a, b, unlisted_coef, listed_coef)
        ctx.mark_non_differentiable(clm, fusion)
        return lam * clm + (1.0 - lam) * fusion, clm, fusion

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fusion):
        logits, lse, nxt, ids, valid, p, a, b, unlisted_coef, listed_coef = ctx.saved_tensors
        weighted_p = b[..., None] * p  # [B, L, W]
        scale = a + weighted_p.sum(-1) - unlisted_coef  # [B, L]
        grad = torch.empty_like(logits)
        for r in range(logits.shape[0]):
            q = (logits[r].float() - lse[r][..., None]).exp_()
            at_ids = q.gather(-1, ids[r]) * listed_coef[r][..., None] * valid[r]
            g = q.mul_(scale[r][..., None])
            g.scatter_add_(-1, nxt[r].clamp(min=0)[..., None], -a[r][..., None])
            g.scatter_add_(-1, ids[r], at_ids - weighted_p[r])
            grad[r] = g * grad_total
        return grad, None, None, None, None, None, None


def _entropy_terms(p: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Σ_w P log P + P_tail log P_tail per position (what KL adds to the soft cross-entropy)."""
    listed = torch.where(p > 0, p * torch.log(p.clamp(min=1e-30)), 0.0).sum(-1)
    return listed + torch.where(tail > 0, tail * torch.log(tail.clamp(min=1e-30)), 0.0)


def _sparse_term(scores, lse, fused_ids, fused_probs, kind, fused_tail=None) -> torch.Tensor:
    """Mean over positions with a fused target of −Σ P log Q − P_tail log(1 − Σ Q) (+ the
    entropy terms for KL)."""
    valid = fused_ids >= 0
    log_q = scores.gather(-1, fused_ids.clamp(min=0)) - lse  # [B, L, W]
    zero = torch.zeros((), device=scores.device)
    p = torch.where(valid, fused_probs.float(), zero)
    has_target = valid.any(-1)
    tail = zero if fused_tail is None else torch.where(has_target, fused_tail.float(), zero)
    rest = (1.0 - torch.where(valid, log_q.exp(), zero).sum(-1)).clamp(min=MIN_REST)
    per_position = (-p * log_q).sum(-1) - tail * torch.log(rest)
    if FusionLoss(kind) is FusionLoss.KL:
        per_position = per_position + _entropy_terms(p, tail * torch.ones_like(rest))
    return (per_position * has_target).sum() / has_target.sum().clamp(min=1)


def dense_fusion_loss(
    logits: torch.Tensor,
    dense_p: torch.Tensor,
    kind: FusionLoss = FusionLoss.SOFT_CE,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Reference with a dense target P [B, L, V] (what the sparse loss avoids); rows of zeros
    are positions without a target."""
    log_q = torch.log_softmax(logits.float() / temperature, dim=-1)
    per_position = -(dense_p * log_q).sum(-1)
    if FusionLoss(kind) is FusionLoss.KL:
        per_position = per_position + torch.where(
            dense_p > 0, dense_p * torch.log(dense_p.clamp(min=1e-30)), 0.0
        ).sum(-1)
    has_target = dense_p.sum(-1) > 0
    return (per_position * has_target).sum() / has_target.sum().clamp(min=1)
