"""The target model's log-probabilities at a few ids per position, with a bounded-memory gradient.

Covers ``sparse_log_probs``: ℓ[n, w] = log softmax(z_n / T)[ids[n, w]] for logits z [N, V] and
ids [N, W] (−1 = no id; its ℓ is 0 and gets no gradient). Any loss that depends on the logits only
through such gathered log-probabilities (the on-policy losses: JSD over the fused support, the
sampled-token reverse KL) is then plain torch code on [N, W] tensors, while the vocabulary-sized
work stays here, chunked: forward computes logsumexp ``chunk`` positions at a time, backward turns
G = ∂L/∂ℓ into ∂L/∂z_n = (scatter_n(G) − (Σ_w G_nw)·softmax(z_n / T)) / T one chunk of [chunk, V]
float32 at a time. No dense target and no second [N, V] tensor besides the gradient itself.

Shapes: logits [..., V] (any leading dims, flattened to N positions), ids [..., W] int64 with
the same leading dims; the result has the ids' shape, float32 (float64 for float64 logits).

Leaves out: what the log-probabilities are compared with (``jsd``, ``sampled_kl``).
"""

from __future__ import annotations

import torch


def sparse_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, chunk: int | None = None
) -> torch.Tensor:
    """log softmax(logits / T) at ``ids`` (shape of ``ids``; 0 where an id is −1)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"loss_chunk: must be >= 1 positions, got {chunk}")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if logits.shape[:-1] != ids.shape[:-1]:
        raise ValueError(
            f"ids: leading shape {tuple(ids.shape[:-1])} != logits' {tuple(logits.shape[:-1])}"
        )
    return _SparseLogProbs.apply(logits, ids, float(temperature), chunk)


class _SparseLogProbs(torch.autograd.Function):
    """ℓ = z[ids] / T − logsumexp(z / T), chunked; see the module docstring for the gradient."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk):
        vocab = logits.shape[-1]
        scores = logits.detach().reshape(-1, vocab)
        flat_ids = ids.reshape(scores.shape[0], -1)
        n = scores.shape[0]
        chunk = n if chunk is None else chunk
        dtype = torch.promote_types(scores.dtype, torch.float32)  # float64 stays float64
        lse = torch.empty(n, dtype=dtype, device=scores.device)
        for s in range(0, n, max(chunk, 1)):
            lse[s : s + chunk] = torch.logsumexp(scores[s : s + chunk].to(dtype) / temperature, -1)
        valid = flat_ids >= 0
        safe = flat_ids.clamp(min=0)
        picked = scores.gather(-1, safe).to(dtype) / temperature - lse[:, None]
        out = torch.where(valid, picked, torch.zeros((), device=scores.device))
        ctx.save_for_backward(logits, lse, safe, valid)
        ctx.temperature, ctx.chunk = temperature, max(chunk, 1)
        return out.view(ids.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, safe, valid = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        scores = logits.reshape(-1, logits.shape[-1])
        g = torch.where(valid, grad_out.reshape(valid.shape).to(lse.dtype), 0.0)  # [N, W]
        total = g.sum(-1)  # [N]
        grad = torch.empty_like(scores)
        for s in range(0, scores.shape[0], chunk):
            e = s + chunk
            q = (scores[s:e].to(lse.dtype) / temperature - lse[s:e, None]).exp_()  # [chunk, V]
            q.mul_(-total[s:e, None])
            q.scatter_add_(-1, safe[s:e], g[s:e])
            grad[s:e] = q.div_(temperature)
        return grad.view_as(logits), None, None, None
