"""The sampled-token reverse KL of on-policy distillation (policy-gradient knowledge distillation).

The student samples x_t; the fused teachers judge it with q(x_t), the fused chain-rule probability
of the sampled token (the aligner's row t − 1 lists the actual next token; for a row that does
not, q(x_t) is taken as its tail mass, an upper bound, floored at ``Q_FLOOR``). Per token the
advantage is A_t = log q(x_t) − log p_θ(x_t), held constant (no gradient), and the loss is

    L = −Σ_t A_t · log p_θ(x_t) / denominator

whose gradient, in expectation over x_t ~ p_θ, is that of the reverse KL(p_θ ‖ q) (the score
function term E[∇ log p_θ] is 0). Its value is a surrogate; ``SampledKL.estimate`` is the
per-token reverse-KL estimate mean(log p_θ(x_t) − log q(x_t)) and ``teacher_nll`` the
teacher-judged NLL mean(−log q(x_t)) of the sampled tokens (nats).

Shapes: logits [B, L, V]; labels [B, L] with the sampled ids where they are completion tokens and
−100 elsewhere (logits[:, i] predicts labels[:, i + 1]); fused rows [B, L, W] / tail [B, L] as in
``loss`` (row i predicts token i + 1).

Leaves out: sampling (``generation``), which tokens are completion tokens (``onpolicy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuseserve.trainer.sparse_logprobs import sparse_log_probs

Q_FLOOR = 1e-8  # floor of q(x_t) (a sampled token no teacher gives any mass to)


def sampled_token_log_q(
    next_ids: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_probs: torch.Tensor,
    fused_tail: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(x), listed) [B, L]: the fused log-probability of ``next_ids`` [B, L] in each row
    (its listed entry; else the row's tail mass) and whether the row lists it."""
    match = (fused_ids == next_ids[..., None]) & (fused_ids >= 0)
    listed = match.any(-1)
    dtype = torch.promote_types(fused_probs.dtype, torch.float32)
    q = torch.where(match, fused_probs.to(dtype), 0.0).sum(-1)
    if fused_tail is not None:
        q = torch.where(listed, q, fused_tail.to(dtype))
    return torch.log(q.clamp(min=Q_FLOOR)), listed


@dataclass
class SampledKL:
    """The surrogate loss (differentiable) and, detached, the reverse-KL estimate and the
    teacher-judged NLL per token, the token count and how many sampled tokens were unlisted."""

    loss: torch.Tensor
    estimate: torch.Tensor
    teacher_nll: torch.Tensor
    tokens: int
    unlisted: int


def sampled_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_probs: torch.Tensor,
    fused_tail: torch.Tensor | None = None,
    temperature: float = 1.0,
    denominator: float | None = None,
    chunk: int | None = None,
) -> SampledKL:
    """−Σ A_t log p_θ(x_t) over the completion tokens in ``labels``, / ``denominator``."""
    next_ids = torch.full_like(labels, -100)
    next_ids[:, :-1] = labels[:, 1:]
    mask = next_ids != -100
    safe = torch.where(mask, next_ids, -1)
    log_p = sparse_log_probs(logits, safe[..., None], temperature, chunk)[..., 0]  # [B, L]
    log_q, listed = sampled_token_log_q(safe.clamp(min=0), fused_ids, fused_probs, fused_tail)
    advantage = (log_q - log_p).detach()
    n = int(mask.sum())
    denom = float(max(n, 1) if denominator is None else max(float(denominator), 1.0))
    zero = torch.zeros((), device=logits.device)
    loss = torch.where(mask, -advantage * log_p, zero).sum() / denom
    estimate = torch.where(mask, -advantage, zero).sum() / denom
    nll = torch.where(mask, -log_q, zero).sum() / denom
    unlisted = int((mask & ~listed).sum())
    return SampledKL(loss, estimate, nll, n, unlisted)
