"""Bits per byte against a hand-computed value: a model whose logits are all zero is uniform."""

from __future__ import annotations

import math

import pytest
import torch

from fuseserve.teacher.tiny import build_tiny_llama
from fuseserve.trainer.evaluate import bits_per_byte


def test_uniform_model_bpb_is_tokens_times_log2_vocab_over_bytes(mistral_tok, prose):
    model = build_tiny_llama(mistral_tok, seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    texts = [prose[:700], "naïve café ꙮ " * 5]
    result = bits_per_byte(model, mistral_tok, texts, max_length=64, batch_size=3)
    n_tokens = sum(len(mistral_tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result.tokens == n_tokens and result.bytes == n_bytes  # BOS: every token predicted
    assert result.value == pytest.approx(n_tokens * math.log2(len(mistral_tok)) / n_bytes, rel=1e-5)


def test_a_better_model_has_lower_bpb(mistral_tok, prose):
    uniform = build_tiny_llama(mistral_tok, seed=0)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    # a model that knows the unigram frequencies of this very text does better than uniform
    ids = mistral_tok(prose[:2000], add_special_tokens=False)["input_ids"]
    counts = torch.bincount(torch.tensor(ids), minlength=len(mistral_tok)).float() + 0.01
    unigram = build_tiny_llama(mistral_tok, seed=0)
    with torch.no_grad():
        unigram.lm_head.weight.zero_()
        unigram.lm_head.bias = torch.nn.Parameter(counts.log())
    a = bits_per_byte(uniform, mistral_tok, [prose[:2000]], max_length=128)
    b = bits_per_byte(unigram, mistral_tok, [prose[:2000]], max_length=128)
    assert b.value < a.value


def test_eval_cli_prints_a_table_per_domain(tmp_path, mistral_tok, prose):
    import json
    import subprocess
    import sys

    from fuseserve.teacher.tiny import save_tiny_llama

    model = save_tiny_llama(mistral_tok, tmp_path / "tiny", seed=0)
    (tmp_path / "prose.txt").write_text(prose[:1500])
    (tmp_path / "code.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x\n"}) + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "fuseserve.cli", "eval", "--model", str(model),
         "--data", f"prose={tmp_path / 'prose.txt'}", "--data", f"code={tmp_path / 'code.jsonl'}",
         "--max-length", "128", "--json", str(tmp_path / "bpb.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| model | prose | code |" in run.stdout
    values = json.loads((tmp_path / "bpb.json").read_text())[str(model)]
    # an untrained model is close to uniform: about log2(32000) bits per token
    assert set(values) == {"prose", "code"} and all(1.0 < v < 15.0 for v in values.values())
    bad = subprocess.run(
        [sys.executable, "-m", "fuseserve.cli", "eval", "--model", str(model), "--data", "nope"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "domain=path" in bad.stderr


def test_response_only_bpb_counts_the_assistant_turns(smol_tok, tiny_dirs, tmp_path, capsys):
    """A uniform model: log2(V) bits for each token of "Hello!<|im_end|>\\n" and "4<|im_end|>\\n",
    over the 7 bytes of "Hello!" and "4"."""
    from fuseserve.cli import build_parser
    from fuseserve.trainer.data import chat_blocks
    from fuseserve.trainer.evaluate import response_bits_per_byte
    from tests.trainer.test_accumulation import HAND_WORKED

    model = build_tiny_llama(smol_tok, seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    (block,) = chat_blocks(smol_tok, [HAND_WORKED], block_size=256)
    n_assistant = int(block.loss_mask.sum())
    result = response_bits_per_byte(model, smol_tok, [HAND_WORKED], max_length=64)
    assert result.tokens == n_assistant and result.bytes == 7
    assert result.value == pytest.approx(n_assistant * math.log2(len(smol_tok)) / 7, rel=1e-5)
    # the CLI: fuseserve eval --chat on a chat jsonl file
    import json

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": HAND_WORKED}) + "\n")
    out = tmp_path / "bpb.json"
    argv = ["eval", "--model", str(tiny_dirs["bpe"]), "--data", f"chat={path}", "--chat"]
    args = build_parser().parse_args([*argv, "--json", str(out)])
    assert args.func(args) == 0
    assert json.loads(out.read_text())[str(tiny_dirs["bpe"])]["chat"] > 0
    assert "| chat |" in capsys.readouterr().out
