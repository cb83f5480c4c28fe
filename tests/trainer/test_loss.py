"""The sparse fusion loss against a dense reference and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from fuseserve.trainer.loss import (
    FusionLoss,
    clm_loss,
    combined_loss,
    dense_fusion_loss,
    fusion_loss,
)


def random_sparse(b, length, vocab, width, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((b, length, width), -1, dtype=torch.long)
    probs = torch.zeros((b, length, width))
    for i in range(b):
        for j in range(length):
            if j == length - 2:
                continue  # a position without a fused target
            w = int(torch.randint(1, width + 1, (1,), generator=g))
            chosen = torch.randperm(vocab, generator=g)[:w]
            p = torch.rand(w, generator=g) + 0.05
            ids[i, j, :w] = chosen
            probs[i, j, :w] = p / p.sum()
    return ids, probs


def densify(ids, probs, vocab):
    dense = torch.zeros((*ids.shape[:2], vocab))
    dense.scatter_add_(-1, ids.clamp(min=0), torch.where(ids >= 0, probs, 0.0))
    return dense


@pytest.mark.parametrize("kind", list(FusionLoss))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_equals_dense_values_and_gradients(kind, temperature):
    vocab = 50
    ids, probs = random_sparse(2, 7, vocab, 6, seed=3)
    logits = torch.randn(2, 7, vocab, generator=torch.Generator().manual_seed(1))
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    sparse = fusion_loss(a, ids, probs, kind, temperature)
    dense = dense_fusion_loss(b, densify(ids, probs, vocab), kind, temperature)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)


def test_hand_worked_values():
    # uniform target over 3 tokens: log Q = -ln 3 everywhere
    logits = torch.zeros(1, 1, 3)
    ids = torch.tensor([[[0, 1, -1]]])
    probs = torch.tensor([[[0.5, 0.5, 0.0]]])
    assert fusion_loss(logits, ids, probs).item() == pytest.approx(math.log(3))
    # KL = sum p log p - sum p log q = -ln 2 + ln 3
    kl = fusion_loss(logits, ids, probs, FusionLoss.KL).item()
    assert kl == pytest.approx(math.log(3) - math.log(2))
    # a one-hot fused target equals the CLM loss on that token
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    onehot = fusion_loss(logits, torch.tensor([[[1], [-1]]]), torch.tensor([[[1.0], [0.0]]]))
    clm = clm_loss(logits, torch.tensor([[0, 1]]))
    assert onehot.item() == pytest.approx(clm.item())


def test_combined_weights_and_clm_only():
    vocab = 20
    ids, probs = random_sparse(1, 5, vocab, 3, seed=0)
    logits = torch.randn(1, 5, vocab)
    labels = torch.randint(0, vocab, (1, 5))
    total, clm, fusion = combined_loss(logits, labels, ids, probs, lam=0.9)
    assert total.item() == pytest.approx(0.9 * clm.item() + 0.1 * fusion.item())
    only, clm2, zero = combined_loss(logits, labels, None, None, lam=1.0)
    assert only.item() == pytest.approx(clm2.item()) and zero.item() == 0.0


@pytest.mark.parametrize("kind", list(FusionLoss))
def test_shared_logsumexp_path_equals_separate_terms(kind):
    """At T = 1 combined_loss shares one logsumexp: same values and gradients as the two terms."""
    vocab = 40
    ids, probs = random_sparse(2, 6, vocab, 5, seed=7)
    logits = torch.randn(2, 6, vocab, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(3))
    labels[1, 4:] = -100
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    total, clm, fusion = combined_loss(a, labels, ids, probs, lam=0.7, kind=kind)
    assert fusion.item() == pytest.approx(fusion_loss(logits, ids, probs, kind).item(), rel=1e-5)
    ref = 0.7 * clm_loss(b, labels) + 0.3 * fusion_loss(b, ids, probs, kind)
    total.backward()
    ref.backward()
    torch.testing.assert_close(total, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(clm, clm_loss(logits, labels), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)
