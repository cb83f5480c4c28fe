"""The on-policy losses against dense float64 definitions on small vocabularies and by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fuseserve.trainer.jsd import jsd_loss
from fuseserve.trainer.sampled_kl import sampled_kl_loss, sampled_token_log_q
from fuseserve.trainer.sparse_logprobs import sparse_log_probs


def random_rows(b, length, vocab, width, seed, tail=True):
    """Fused rows with distinct ids per row, probabilities summing to 1 − tail; one row empty."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((b, length, width), -1, dtype=torch.long)
    probs = torch.zeros((b, length, width), dtype=torch.float64)
    tails = torch.zeros((b, length), dtype=torch.float64)
    for i in range(b):
        for j in range(length):
            if j == 1:
                continue  # a row without a target
            w = int(torch.randint(1, width + 1, (1,), generator=g))
            p = torch.rand(w, generator=g, dtype=torch.float64) + 0.05
            t = float(torch.rand(1, generator=g)) * 0.4 if tail else 0.0
            ids[i, j, :w] = torch.randperm(vocab, generator=g)[:w]
            probs[i, j, :w] = p / p.sum() * (1 - t)
            tails[i, j] = t
    return ids, probs, tails


def dense_bucketed_jsd(logits, ids, probs, tails, beta, temperature):
    """The definition, densely in float64: softmax over the whole vocabulary, the rest bucket as
    the explicit sum of Q over the unlisted ids, and the divergence written out per outcome."""
    q_all = torch.softmax(logits.double() / temperature, -1)
    total, rows = 0.0, 0
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            listed = [int(v) for v in ids[i, j] if v >= 0]
            if not listed:
                continue
            unlisted = torch.ones(q_all.shape[-1], dtype=torch.bool)
            unlisted[listed] = False
            q = torch.cat([q_all[i, j, listed], q_all[i, j][unlisted].sum()[None]])
            p = torch.cat([probs[i, j, : len(listed)], tails[i, j][None]]).double()
            total = total + gjsd(p, q, beta)
            rows += 1
    return total / rows


def gjsd(p, q, beta):
    def kl(a, b):
        keep = a > 0
        return (a[keep] * (a[keep].log() - b[keep].log())).sum()

    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_the_dense_definition_with_its_gradient(beta, temperature):
    vocab = 11
    ids, probs, tails = random_rows(2, 5, vocab, 4, seed=7)
    logits = torch.randn(2, 5, vocab, generator=torch.Generator().manual_seed(2))
    a = logits.clone().requires_grad_(True)
    b = logits.double().clone().requires_grad_(True)
    sparse = jsd_loss(a, ids, probs.float(), tails.float(), beta, temperature, chunk=3)
    dense = dense_bucketed_jsd(b, ids, probs, tails, beta, temperature)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(sparse.double(), dense, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_over_the_whole_vocabulary_is_the_plain_divergence(beta):
    """Rows that list every id (no tail) give the ordinary JSD(β) of two full distributions."""
    vocab = 6
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(1, 3, vocab, generator=g, dtype=torch.float64), -1)
    ids = torch.arange(vocab).expand(1, 3, vocab).clone()
    logits = torch.randn(1, 3, vocab, generator=g, dtype=torch.float64)
    got = jsd_loss(logits, ids, p, None, beta)
    q = torch.softmax(logits, -1)
    want = sum(gjsd(p[0, j], q[0, j], beta) for j in range(3)) / 3
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_jsd_hand_worked():
    # Q uniform over 4 ids; row lists ids 0, 1 with P = (0.5, 0.25), tail 0.25
    # buckets: P = (1/2, 1/4, 1/4), Q = (1/4, 1/4, 1/2)
    logits = torch.zeros(1, 1, 4)
    ids = torch.tensor([[[0, 1]]])
    probs = torch.tensor([[[0.5, 0.25]]])
    tail = torch.tensor([[0.25]])
    forward = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # Σ P log P/Q
    reverse = 0.25 * math.log(0.5) + 0.5 * math.log(2)  # Σ Q log Q/P
    assert jsd_loss(logits, ids, probs, tail, 0.0).item() == pytest.approx(forward, abs=1e-6)
    assert jsd_loss(logits, ids, probs, tail, 1.0).item() == pytest.approx(reverse, abs=1e-6)
    # β = 0.5: M = (3/8, 1/4, 3/8); 0.5·KL(P‖M) + 0.5·KL(Q‖M)
    kl_pm = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)
    kl_qm = 0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)
    half = jsd_loss(logits, ids, probs, tail, 0.5).item()
    assert half == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, abs=1e-6)
    # equal distributions: every β gives 0
    same = torch.tensor([[[0.25, 0.25]]])
    for beta in (0.0, 0.5, 1.0):
        assert jsd_loss(logits, ids, same, torch.tensor([[0.5]]), beta).item() == pytest.approx(0)


def test_jsd_denominator_sums_micro_batches_to_one_batch():
    vocab = 9
    ids, probs, tails = random_rows(4, 4, vocab, 3, seed=1)
    logits = torch.randn(4, 4, vocab)
    whole = jsd_loss(logits, ids, probs.float(), tails.float(), 0.5)
    n = int((ids >= 0).any(-1).sum())
    parts = sum(
        jsd_loss(logits[s : s + 2], ids[s : s + 2], probs[s : s + 2].float(),
                 tails[s : s + 2].float(), 0.5, denominator=n)
        for s in (0, 2)
    )  # fmt: skip
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5)


def test_sparse_log_probs_gradient_matches_log_softmax_in_chunks():
    vocab = 13
    logits = torch.randn(3, 4, vocab, dtype=torch.float64)
    ids = torch.randint(0, vocab, (3, 4, 2))
    ids[0, 0, 1] = -1
    weights = torch.randn(3, 4, 2, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    (sparse_log_probs(a, ids, 1.5, chunk=5) * weights).sum().backward()
    dense = torch.log_softmax(b / 1.5, -1).gather(-1, ids.clamp(min=0))
    (torch.where(ids >= 0, dense, 0.0) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_chunk"):
        sparse_log_probs(logits, ids, chunk=0)


def sampled_setup(vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 4, vocab, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(1, 4, vocab, generator=g, dtype=torch.float64), -1)
    ids = torch.arange(vocab).expand(1, 4, vocab).clone()  # rows list every id: q exact
    return logits, q, ids


def test_sampled_kl_gradient_in_expectation_is_the_reverse_kl_gradient():
    """Σ_x p_θ(x) · ∇(surrogate at x) equals ∇ KL(p_θ ‖ q) exactly (one position, all x)."""
    vocab = 7
    logits, q, ids = sampled_setup(vocab)
    pos = 2  # row 2 predicts token 3
    z = logits.clone().requires_grad_(True)
    p_theta = torch.softmax(logits[0, pos], -1)
    expected_grad = torch.zeros_like(logits)
    for x in range(vocab):
        labels = torch.full((1, 4), -100)
        labels[0, pos + 1] = x
        zi = logits.clone().requires_grad_(True)
        sampled_kl_loss(zi, labels, ids, q, None).loss.backward()
        expected_grad += p_theta[x] * zi.grad
    reverse_kl = (torch.softmax(z[0, pos], -1) * (
        torch.log_softmax(z[0, pos], -1) - q[0, pos].log())).sum()  # fmt: skip
    reverse_kl.backward()
    torch.testing.assert_close(expected_grad, z.grad, atol=1e-10, rtol=1e-8)


def test_sampled_kl_hand_worked_and_masking():
    # two tokens sampled: uniform student over 4 (log p = −ln 4); q(x) = 0.5 and 0.125
    logits = torch.zeros(1, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 1, 3]])
    ids = torch.tensor([[[1, 2], [0, 3], [-1, -1]]])
    probs = torch.tensor([[[0.5, 0.3], [0.125, 0.5], [0.0, 0.0]]], dtype=torch.float64)
    out = sampled_kl_loss(logits, labels, ids, probs, None)
    a1, a2 = math.log(0.5) + math.log(4), math.log(0.5) + math.log(4)
    # row 1 lists 3 with 0.5 too: both advantages are log 2
    assert out.tokens == 2 and out.unlisted == 0
    assert out.estimate.item() == pytest.approx(-(a1 + a2) / 2)
    assert out.teacher_nll.item() == pytest.approx(math.log(2))
    assert out.loss.item() == pytest.approx(-(a1 + a2) / 2 * -math.log(4))
    out.loss.backward()
    # ∂/∂z of −A·log p(x) = −A·(onehot(x) − p): row 0, x = 1, A = ln 2
    want = -math.log(2) * (torch.tensor([0.0, 1.0, 0.0, 0.0]) - 0.25) / 2
    torch.testing.assert_close(logits.grad[0, 0], want.double())
    assert torch.all(logits.grad[0, 2] == 0)  # no completion token after the last row


def test_sampled_token_missing_from_a_row_takes_the_tail_mass():
    next_ids = torch.tensor([[5, 1]])
    ids = torch.tensor([[[1, 2], [1, -1]]])
    probs = torch.tensor([[[0.6, 0.3], [0.9, 0.0]]])
    tail = torch.tensor([[0.1, 0.1]])
    log_q, listed = sampled_token_log_q(next_ids, ids, probs, tail)
    assert listed.tolist() == [[False, True]]
    torch.testing.assert_close(log_q, torch.tensor([[math.log(0.1), math.log(0.9)]]))
