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

Chunks: the shared path works on the N = B·L positions ``chunk`` at a time, so besides the logits
and their gradient (both [B, L, V], owned by autograd) its temporaries are [chunk, V] float32:
peak loss memory stays bounded at large vocabularies (128k). ``denominators`` = (label count,
target count) of a whole optimizer step makes the terms sums over that step, so micro-batches of
gradient accumulation add up to exactly the loss (and gradient) of one big batch.

Leaves out: where P comes from (``prefetch``), schedules of λ (``config``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fuseserve.trainer.loss_kind import FusionLoss


def clm_loss(
    logits: torch.Tensor, labels: torch.Tensor, denominator: float | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy: logits[:, i] predicts labels[:, i + 1] (−100 ignored);
    with ``denominator`` the sum divided by it instead of by this batch's label count."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    if denominator is None:
        return F.cross_entropy(shifted.float(), target, ignore_index=-100)
    total = F.cross_entropy(shifted.float(), target, ignore_index=-100, reduction="sum")
    return total / max(float(denominator), 1.0)


def loss_counts(labels: torch.Tensor, fused_ids: torch.Tensor | None) -> tuple[int, int]:
    """(positions with a next-token label, positions with a fused target) of one batch: add them
    over the micro-batches of a step to get the step's ``denominators``."""
    n_label = int((labels[:, 1:] != -100).sum())
    n_target = 0 if fused_ids is None else int((fused_ids >= 0).any(-1).sum())
    return n_label, n_target


MIN_REST = 1e-6  # floor of 1 − Σ_listed Q in the tail term (its log stays finite)


def fusion_loss(
    logits: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_probs: torch.Tensor,
    kind: FusionLoss = FusionLoss.SOFT_CE,
    temperature: float = 1.0,
    fused_tail: torch.Tensor | None = None,
    denominator: float | None = None,
) -> torch.Tensor:
    """Mean over positions that carry a fused distribution of −Σ P log Q − P_tail log(1 − ΣQ)
    (plus Σ P log P + P_tail log P_tail for KL); with ``denominator`` the sum divided by it."""
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [B, L, 1]
    return _sparse_term(scaled, lse, fused_ids, fused_probs, kind, fused_tail, denominator)


def combined_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor | None,
    fused_probs: torch.Tensor | None,
    lam: float,
    kind: FusionLoss = FusionLoss.SOFT_CE,
    temperature: float = 1.0,
    fused_tail: torch.Tensor | None = None,
    denominators: tuple[float, float] | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, clm, fusion): total = lam * clm + (1 - lam) * fusion (fusion 0 when lam == 1).

    At T = 1 both terms share one logsumexp over the vocabulary, so the fused step costs about
    what a CLM step costs (plus gathers of width W). ``chunk``: positions per slice of the shared
    path (None = all at once; with a chunk a CLM-only batch takes the shared path too, so its
    memory is bounded the same way). ``denominators``: (labels, targets) counts of the whole step.
    """
    if lam >= 1.0 or fused_ids is None or fused_probs is None:  # no fusion targets
        if chunk is None:
            clm = clm_loss(logits, labels, None if denominators is None else denominators[0])
            return clm, clm, torch.zeros((), device=logits.device)
        lam = 1.0
        fused_ids = torch.full((*labels.shape, 0), -1, dtype=torch.long, device=logits.device)
        fused_probs = torch.zeros(fused_ids.shape, device=logits.device)
        fused_tail = None
    elif temperature != 1.0:
        n_label, n_target = denominators if denominators is not None else (None, None)
        clm = clm_loss(logits, labels, n_label)
        fusion = fusion_loss(
            logits, fused_ids, fused_probs, kind, temperature, fused_tail, n_target
        )
        return lam * clm + (1.0 - lam) * fusion, clm, fusion
    if fused_tail is None:
        fused_tail = torch.zeros(fused_ids.shape[:-1], device=logits.device)
    if chunk is not None and chunk < 1:
        raise ValueError(f"loss_chunk: must be >= 1 positions, got {chunk}")
    return _SharedSoftmaxLoss.apply(
        logits,
        labels,
        fused_ids,
        fused_probs,
        fused_tail,
        lam,
        FusionLoss(kind),
        denominators,
        chunk,
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
    def forward(
        ctx, logits, labels, fused_ids, fused_probs, fused_tail, lam, kind, denominators, chunk
    ):
        vocab = logits.shape[-1]
        scores = logits.detach().reshape(-1, vocab)  # [N, V], N = B·L
        n = scores.shape[0]
        chunk = n if chunk is None else chunk
        device = scores.device
        lse = torch.empty(n, dtype=torch.float32, device=device)
        for s in range(0, n, chunk):  # chunks bound logsumexp's temporaries to [chunk, V]
            lse[s : s + chunk] = torch.logsumexp(scores[s : s + chunk].float(), dim=-1)
        nxt = torch.full_like(labels, -100)
        nxt[:, :-1] = labels[:, 1:]
        nxt = nxt.reshape(-1)
        has_label = nxt != -100
        width = fused_ids.shape[-1]
        ids_all = fused_ids.reshape(n, width)
        valid = ids_all >= 0
        has_target = valid.any(-1)
        n_label: torch.Tensor | float
        n_target: torch.Tensor | float
        if denominators is None:
            n_label, n_target = has_label.sum().clamp(min=1), has_target.sum().clamp(min=1)
        else:
            n_label, n_target = (max(float(d), 1.0) for d in denominators)
        picked = scores.gather(-1, nxt.clamp(min=0)[:, None])[:, 0].float()
        clm = ((lse - picked) * has_label).sum() / n_label
        ids = ids_all.clamp(min=0)
        zero = torch.zeros((), device=device)
        p = torch.where(valid, fused_probs.reshape(n, width).float(), zero)
        log_q = scores.gather(-1, ids).float() - lse[:, None]
        tail = torch.where(has_target, fused_tail.reshape(n).float(), zero)
        q_listed = torch.where(valid, log_q.exp(), zero)
        listed = q_listed.sum(-1)  # S [N]
        rest = (1.0 - listed).clamp(min=MIN_REST)  # R [N]
        per_position = (-p * log_q).sum(-1) - tail * torch.log(rest)
        if kind is FusionLoss.KL:
            per_position = per_position + _entropy_terms(p, tail)
        fusion = (per_position * has_target).sum() / n_target
        a = lam * has_label / n_label  # [N]
        b = (1.0 - lam) * has_target / n_target  # [N]
        # the tail term's gradient (zero where R sits at its floor, as the clamp's would be)
        active = (1.0 - listed) > MIN_REST
        unlisted_coef = torch.where(active, b * tail * listed / rest, 0.0)  # × Q, subtracted
        listed_coef = torch.where(active, b * tail / rest, 0.0)  # × Q at listed ids, added
        ctx.save_for_backward(logits, lse, nxt, ids, valid, p, a, b, unlisted_coef, listed_coef)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(clm, fusion)
        return lam * clm + (1.0 - lam) * fusion, clm, fusion

    @staticmethod
    def backward(ctx, grad_total, _grad_clm, _grad_fusion):
        logits, lse, nxt, ids, valid, p, a, b, unlisted_coef, listed_coef = ctx.saved_tensors
        chunk = ctx.chunk
        scores = logits.reshape(-1, logits.shape[-1])
        weighted_p = b[:, None] * p  # [N, W]
        scale = a + weighted_p.sum(-1) - unlisted_coef  # [N]
        grad = torch.empty_like(scores)
        for s in range(0, scores.shape[0], chunk):
            e = s + chunk
            q = (scores[s:e].float() - lse[s:e, None]).exp_()  # [chunk, V]
            at_ids = q.gather(-1, ids[s:e]) * listed_coef[s:e, None] * valid[s:e]
            g = q.mul_(scale[s:e, None])
            g.scatter_add_(-1, nxt[s:e].clamp(min=0)[:, None], -a[s:e, None])
            g.scatter_add_(-1, ids[s:e], at_ids - weighted_p[s:e])
            grad[s:e] = g.mul_(grad_total)
        return grad.view_as(logits), None, None, None, None, None, None, None, None


def _entropy_terms(p: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Σ_w P log P + P_tail log P_tail per position (what KL adds to the soft cross-entropy)."""
    listed = torch.where(p > 0, p * torch.log(p.clamp(min=1e-30)), 0.0).sum(-1)
    return listed + torch.where(tail > 0, tail * torch.log(tail.clamp(min=1e-30)), 0.0)


def _sparse_term(
    scores, lse, fused_ids, fused_probs, kind, fused_tail=None, denominator=None
) -> torch.Tensor:
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
    if denominator is not None:
        return (per_position * has_target).sum() / max(float(denominator), 1.0)
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
