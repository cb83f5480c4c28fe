"""Gradient accumulation equals one big batch; chat blocks put the loss on assistant tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuseserve.teacher.tiny import build_tiny_llama
from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.data import Block, chat_blocks, pack_blocks, render_chat
from fuseserve.trainer.step import accumulate_gradients, batch_tensors
from fuseserve.wire.messages import FusedBlock


def fake_fused(block: Block, vocab: int, seed: int) -> FusedBlock:
    """A fused block shaped like the aligner's: W = 3 ids per row, probabilities and a tail."""
    g = np.random.default_rng(seed)
    n = len(block.ids)
    ids = np.stack([g.choice(vocab, 3, replace=False) for _ in range(n)]).astype(np.int32)
    probs = g.dirichlet(np.ones(4), size=n).astype(np.float32)
    return FusedBlock(
        target_ids=block.ids.astype(np.int32),
        ids=ids,
        probs=probs[:, :3],
        chosen=np.zeros(n, dtype=np.int16),
        ce=np.zeros(1, dtype=np.float32),
        coverage=np.ones(1, dtype=np.float32),
        teachers=("t",),
        tail=probs[:, 3],
    )


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_four_micro_batches_of_one_equal_one_batch_of_four(mistral_tok, prose, lam):
    model = build_tiny_llama(mistral_tok, seed=5)
    vocab = model.config.vocab_size
    # blocks of different lengths, so micro-batches carry different token counts
    blocks = pack_blocks(mistral_tok, [prose[:4000]], block_size=24)[:4]
    blocks = [Block(b.index, b.text, b.ids[: 24 - 3 * i]) for i, b in enumerate(blocks)]
    fused = [fake_fused(b, vocab, i) for i, b in enumerate(blocks)] if lam < 1 else None
    cfg = TrainConfig(model="m", data=["d"], aligner="h:1", lam=lam, loss_chunk=7)
    device = torch.device("cpu")

    whole = accumulate_gradients(model, [batch_tensors(blocks, fused, 0)], lam, cfg, device)
    g_whole = grads(model)
    model.zero_grad(set_to_none=True)
    micro = [batch_tensors([b], [f] if fused else None, 0) for b, f in zip(blocks, fused or blocks)]
    accumulated = accumulate_gradients(model, micro, lam, cfg, device)
    g_acc = grads(model)

    assert accumulated.tokens == whole.tokens == sum(len(b.ids) for b in blocks)
    assert accumulated.loss == pytest.approx(whole.loss, rel=1e-5)
    assert accumulated.fusion == pytest.approx(whole.fusion, rel=1e-5, abs=1e-7)
    for name, g in g_whole.items():
        torch.testing.assert_close(g_acc[name], g, atol=1e-5, rtol=0, msg=name)


HAND_WORKED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_chat_loss_positions_are_the_assistant_spans(smol_tok):
    """SmolLM2's ChatML template: the loss is on "Hello!<|im_end|>\\n" and "4<|im_end|>\\n"."""
    text, spans = render_chat(smol_tok, HAND_WORKED)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert [text[a:b] for a, b in spans] == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]
    (block,) = chat_blocks(smol_tok, [HAND_WORKED], block_size=256)
    assert block.text == text
    pieces = [smol_tok.decode([i]) for i in block.ids]
    trained = "".join(p for p, m in zip(pieces, block.loss_mask) if m)
    assert trained == "Hello!<|im_end|>\n4<|im_end|>\n"
    # labels keep exactly those tokens; a fused row i is kept where token i + 1 is trained
    fused = fake_fused(block, len(smol_tok), 0)
    _, _, labels, f_ids, _, _ = batch_tensors([block], [fused], 0)
    kept = labels[0] != -100
    assert kept.tolist() == block.loss_mask.tolist()
    rows = (f_ids[0] >= 0).any(-1)
    assert rows[:-1].tolist() == block.loss_mask[1:].tolist() and not rows[-1]


def test_chat_without_a_template_and_prompt_response_lines(mistral_tok, tmp_path):
    from fuseserve.trainer.data import read_conversations

    path = tmp_path / "chat.jsonl"
    path.write_text(
        '{"prompt": "Name a colour.", "response": "Blue."}\n'
        '{"messages": [{"role": "user", "content": "Hi"}]}\n'  # no assistant turn: skipped
    )
    conversations = read_conversations([path])
    assert len(conversations) == 1
    text, spans = render_chat(mistral_tok, conversations[0])
    assert [text[a:b] for a, b in spans] == ["Blue.</s>"]
    (bad := tmp_path / "bad.jsonl").write_text('{"text": "no chat here"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_conversations([bad])


def test_activation_checkpointing_and_bf16_autocast_keep_fp32_master_gradients(mistral_tok, prose):
    """Recomputing activations gives the same gradients; bf16 autocast trains fp32 weights with
    gradients close to fp32's (bf16 has 8 bits of mantissa)."""
    blocks = pack_blocks(mistral_tok, [prose[:3000]], block_size=24)[:2]
    micro = [batch_tensors(blocks, None, 0)]
    device = torch.device("cpu")
    cfg = TrainConfig(model="m", data=["d"], lam=1.0)
    plain = build_tiny_llama(mistral_tok, seed=6).train()
    reference = accumulate_gradients(plain, micro, 1.0, cfg, device)
    checkpointed = build_tiny_llama(mistral_tok, seed=6).train()
    checkpointed.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    again = accumulate_gradients(checkpointed, micro, 1.0, cfg, device)
    assert again.loss == pytest.approx(reference.loss, rel=1e-6)
    for (name, g), p in zip(grads(plain).items(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5, msg=name)
    mixed = build_tiny_llama(mistral_tok, seed=6).train()
    bf16 = TrainConfig(model="m", data=["d"], lam=1.0, mixed_precision="bf16")
    low = accumulate_gradients(mixed, micro, 1.0, bf16, device)
    assert low.loss == pytest.approx(reference.loss, rel=2e-2) and low.loss != reference.loss
    for p in mixed.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32


def test_wrap_model_turns_activation_checkpointing_on_for_ddp(mistral_tok):
    from types import SimpleNamespace

    from fuseserve.trainer.recipe import wrap_model

    model = build_tiny_llama(mistral_tok, seed=6).train()
    assert not model.is_activation_checkpointing
    cfg = TrainConfig(model="m", data=["d"], lam=1.0, activation_checkpointing=True)
    wrapped = wrap_model(model, cfg, SimpleNamespace(prepare_model=lambda m: m))
    assert wrapped is model and model.is_activation_checkpointing
