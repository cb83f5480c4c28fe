"""On-policy prompts: a jsonl with real tokenizers (with and without a chat template), prompts
cut from blocks, the order; and generation's left padding and EOS cut."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuseserve.trainer.data import Block
from fuseserve.trainer.generation import cut_at_eos, left_pad, sampling_seed
from fuseserve.trainer.prompts import block_prompts, prompt_indices, read_prompts


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_prompts_render_with_the_chat_template_when_there_is_one(smol_tok, tmp_path):
    messages = [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Name a prime."}, {"messages": messages}])
    first, second = read_prompts(path, smol_tok, 512)
    text = smol_tok.decode(first.ids.tolist())
    want = smol_tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text == want and text.endswith("<|im_start|>assistant\n")
    np.testing.assert_array_equal(first.ids, second.ids)  # the assistant turn is dropped


def test_a_tokenizer_without_a_template_continues_plain_prompts(mistral_tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def add(a, b):"}])
    (prompt,) = read_prompts(path, mistral_tok, 3)
    full = mistral_tok("def add(a, b):", add_special_tokens=False)["input_ids"]
    assert prompt.ids.tolist() == full[-3:]  # a long prompt keeps its last tokens


def test_bad_prompt_lines_name_the_field(mistral_tok, tmp_path):
    with pytest.raises(ValueError, match=r"prompts: .*p.jsonl:2: .*'prompt' or 'messages'"):
        read_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"text": "b"}]),
                     mistral_tok, 8)  # fmt: skip
    with pytest.raises(ValueError, match="messages must be a list"):
        read_prompts(write_jsonl(tmp_path / "q.jsonl", [{"messages": "hi"}]), mistral_tok, 8)


def test_block_prompts_are_prefixes_and_chat_prompts_stop_at_the_assistant():
    ids = np.arange(10, 20)
    mask = np.array([False] * 6 + [True] * 4)
    plain, chat = block_prompts([Block(0, "", ids), Block(1, "", ids, mask)], 4)
    assert plain.ids.tolist() == [10, 11, 12, 13]
    assert chat.ids.tolist() == [10, 11, 12, 13, 14, 15]


def test_prompt_order_splits_steps_across_workers_and_epochs():
    steps = [[prompt_indices(10, 0, r, 2, 2, k) for r in (0, 1)] for k in range(4)]
    epoch0 = [i for step in steps[:2] for part in step for i in part]
    assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 8  # no prompt twice
    assert prompt_indices(10, 0, 1, 2, 2, 3) == steps[3][1]  # a function of k
    with pytest.raises(ValueError, match="prompts: 3 prompts"):
        prompt_indices(3, 0, 0, 2, 2, 0)


def test_left_padding_and_the_eos_cut():
    ids, mask = left_pad([np.array([5, 6, 7]), np.array([9])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_eos(np.array([4, 8, 2, 3, 2]), [2]).tolist() == [4, 8]
    assert cut_at_eos(np.array([4, 8]), [2]).tolist() == [4, 8]
    assert sampling_seed(0, 3, 1, 0) == sampling_seed(0, 3, 1, 0) != sampling_seed(0, 3, 0, 0)


def test_sampling_is_seeded_leaves_the_rng_alone_and_goes_through_ddp(tiny_dirs, mistral_tok):
    """The same seed samples the same through the model and through its DDP wrapper; the
    global RNG is where it was; completions stop before EOS and have 1..max_new_tokens ids."""
    import os
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from fuseserve.launch import free_port
    from fuseserve.trainer.generation import eos_ids_of, sample_completions

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["spm"])
    settings = SimpleNamespace(
        sampling_temperature=1.0, top_p=0.9, max_new_tokens=7, mixed_precision="no"
    )
    prompts = [np.array([415, 1369, 349]), np.array([28705])]
    eos, cpu = eos_ids_of(model, mistral_tok), torch.device("cpu")
    state = torch.get_rng_state()
    plain = sample_completions(model, prompts, settings, cpu, 0, eos, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        through_ddp = sample_completions(wrapped, prompts, settings, cpu, 0, eos, seed=11)
    finally:
        dist.destroy_process_group()
    assert [c.tolist() for c in through_ddp] == [c.tolist() for c in plain]
    other = sample_completions(model, prompts, settings, cpu, 0, eos, seed=12)
    assert [c.tolist() for c in other] != [c.tolist() for c in plain]
    assert all(1 <= len(c) <= 7 and not set(c.tolist()) & set(eos) for c in plain)
