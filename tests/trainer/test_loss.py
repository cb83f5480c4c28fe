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
    loss_counts,
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


def with_tail(ids, probs, seed):
    """Scale each row to leave a random tail mass: listed probs + tail = 1."""
    g = torch.Generator().manual_seed(seed)
    tail = torch.rand(ids.shape[:2], generator=g) * 0.6
    tail = torch.where((ids >= 0).any(-1), tail, 0.0)
    return probs * (1 - tail)[..., None], tail


def tail_reference(logits, ids, probs, tail, kind):
    """−Σ P log Q − P_tail log(Σ_{v not listed} Q_v), written densely (the definition)."""
    log_q = torch.log_softmax(logits.float(), -1)
    listed = torch.zeros_like(log_q).scatter_add_(-1, ids.clamp(min=0), (ids >= 0).float()) > 0
    unlisted = torch.logsumexp(log_q.masked_fill(listed, float("-inf")), -1)
    per = -(densify(ids, probs, logits.shape[-1]) * log_q).sum(-1) - tail * unlisted
    if kind is FusionLoss.KL:
        per = per + torch.where(probs > 0, probs * torch.log(probs.clamp(min=1e-30)), 0.0).sum(-1)
        per = per + torch.where(tail > 0, tail * torch.log(tail.clamp(min=1e-30)), 0.0)
    has = (ids >= 0).any(-1)
    return (per * has).sum() / has.sum()


@pytest.mark.parametrize("kind", list(FusionLoss))
def test_tail_mass_term_values_and_gradients(kind):
    vocab = 30
    ids, probs = random_sparse(2, 6, vocab, 4, seed=11)
    probs, tail = with_tail(ids, probs, seed=12)
    logits = torch.randn(2, 6, vocab, generator=torch.Generator().manual_seed(13)) * 2
    labels = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(14))
    a, b, c, d = (logits.clone().requires_grad_(True) for _ in range(4))
    total, _, fusion = combined_loss(a, labels, ids, probs, 0.6, kind, fused_tail=tail)
    ref = 0.6 * clm_loss(b, labels) + 0.4 * tail_reference(b, ids, probs, tail, kind)
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)
    total.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    # the separate path (used at T != 1) agrees too
    separate = fusion_loss(c, ids, probs, kind, fused_tail=tail)
    assert separate.item() == pytest.approx(fusion.item(), rel=1e-5)
    separate.backward()
    tail_reference(d, ids, probs, tail, kind).backward()
    torch.testing.assert_close(c.grad, d.grad, atol=1e-6, rtol=1e-4)


def test_zero_tail_is_the_plain_soft_cross_entropy():
    vocab = 25
    ids, probs = random_sparse(1, 5, vocab, 3, seed=4)
    logits = torch.randn(1, 5, vocab)
    plain = fusion_loss(logits, ids, probs)
    assert fusion_loss(logits, ids, probs, fused_tail=torch.zeros(1, 5)).item() == pytest.approx(
        plain.item()
    )
    # a hand-worked row: target Q = (0.5, 0.25, 0.25) over 3 ids, P lists id 0 with 0.6, tail 0.4
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    one = fusion_loss(
        logits, torch.tensor([[[0]]]), torch.tensor([[[0.6]]]), fused_tail=torch.tensor([[0.4]])
    )
    assert one.item() == pytest.approx(-0.6 * math.log(0.5) - 0.4 * math.log(0.5))


@pytest.mark.parametrize("kind", list(FusionLoss))
def test_chunked_equals_unchunked(kind):
    """Positions in chunks of 4 (not a divisor of B·L = 14): same values and gradients."""
    vocab = 33
    ids, probs = random_sparse(2, 7, vocab, 4, seed=21)
    probs, tail = with_tail(ids, probs, seed=22)
    logits = torch.randn(2, 7, vocab, generator=torch.Generator().manual_seed(23))
    labels = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(24))
    labels[0, 5:] = -100
    a, b = (logits.clone().requires_grad_(True) for _ in range(2))
    whole = combined_loss(a, labels, ids, probs, 0.8, kind, fused_tail=tail)
    chunked = combined_loss(b, labels, ids, probs, 0.8, kind, fused_tail=tail, chunk=4)
    for x, y in zip(whole, chunked):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    whole[0].backward()
    chunked[0].backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)
    # CLM only through the chunked path equals the plain cross-entropy
    c, d = (logits.clone().requires_grad_(True) for _ in range(2))
    only, _, zero = combined_loss(c, labels, None, None, lam=1.0, chunk=3)
    ref = clm_loss(d, labels)
    torch.testing.assert_close(only, ref, atol=1e-6, rtol=1e-6)
    assert zero.item() == 0.0
    only.backward()
    ref.backward()
    torch.testing.assert_close(c.grad, d.grad, atol=1e-7, rtol=1e-5)


def test_step_denominators_make_micro_batches_add_up_to_the_batch():
    """Rows scored one at a time with the whole batch's counts sum to the batch loss."""
    vocab = 19
    ids, probs = random_sparse(3, 6, vocab, 3, seed=31)
    logits = torch.randn(3, 6, vocab, generator=torch.Generator().manual_seed(32))
    labels = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(33))
    labels[2, 3:] = -100  # rows with different label counts
    ids[1, :2] = -1  # and different target counts
    counts = loss_counts(labels, ids)
    assert counts == (int((labels[:, 1:] != -100).sum()), int((ids >= 0).any(-1).sum()))
    for temperature in (1.0, 1.5):
        batch = combined_loss(logits, labels, ids, probs, 0.7, temperature=temperature)
        parts = [
            combined_loss(
                logits[r : r + 1],
                labels[r : r + 1],
                ids[r : r + 1],
                probs[r : r + 1],
                0.7,
                temperature=temperature,
                denominators=counts,
            )
            for r in range(3)
        ]
        for i in range(3):
            total = sum(p[i] for p in parts)
            torch.testing.assert_close(total, batch[i], atol=1e-6, rtol=1e-6)
    for chunk in (None, 5):  # CLM only: the plain cross-entropy and the chunked path
        batch = combined_loss(logits, labels, None, None, 1.0, chunk=chunk)[0]
        parts = [
            combined_loss(logits[r : r + 1], labels[r : r + 1], None, None, 1.0, chunk=chunk,
                          denominators=counts)[0]
            for r in range(3)
        ]  # fmt: skip
        torch.testing.assert_close(sum(parts), batch, atol=1e-6, rtol=1e-6)
