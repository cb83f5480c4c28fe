"""Prompts of on-policy steps: where they come from and which ones a step takes.

Covers reading a prompts jsonl (each line a ``prompt`` string or chat ``messages``), rendering it
as the target model sees it, cutting prompts from the training blocks instead (the first
``prompt_tokens`` tokens of each block; a chat block's prompt is everything before its first
assistant token), and the order: a permutation per epoch from the seed, each on-policy step taking
``batch_size × grad_accum × workers`` consecutive prompts and worker ``rank`` its slice, so the
prompt position is a function of how many on-policy steps came before (restored on resume).

Rendering: ``messages`` (trailing assistant turns dropped) go through the target tokenizer's chat
template with the generation prompt (the plain fallback template of chat training when it has
none); a ``prompt`` string is rendered as one user turn when the tokenizer has a chat template and
used as it is otherwise. Prompts are tokenised without special tokens, as training blocks are;
a prompt longer than ``prompt_tokens`` keeps its last tokens (the ones next to the completion).

Leaves out: generating completions (``generation``), fused targets (``prefetch``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fuseserve.trainer.data import FALLBACK_CHAT_TEMPLATE, Block


@dataclass(frozen=True)
class Prompt:
    """One prompt: its index in the prompt list and its target ids [n]."""

    index: int
    ids: np.ndarray


def render_prompt(tokenizer, record: dict, where: str) -> str:
    """The text the model continues for one jsonl record (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages
        ):
            raise ValueError(f"prompts: {where}: messages must be a list of {{role, content}}")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise ValueError(f"prompts: {where}: no message before the assistant's turn")
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            chat_template=None if template else FALLBACK_CHAT_TEMPLATE,
        )
    if "prompt" in record:
        text = str(record["prompt"])
        if not template:
            return text
        turn = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"prompts: {where}: a line needs a 'prompt' or 'messages' field")


def read_prompts(path: str | Path, tokenizer, max_tokens: int) -> list[Prompt]:
    """The prompts of a jsonl file, rendered and tokenised (at most ``max_tokens``, the last)."""
    prompts: list[Prompt] = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            text = render_prompt(tokenizer, json.loads(line), f"{path}:{n}")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:]
            if not ids:
                raise ValueError(f"prompts: {path}:{n}: the prompt has no tokens")
            prompts.append(Prompt(len(prompts), np.asarray(ids, dtype=np.int64)))
    if not prompts:
        raise ValueError(f"prompts: {path} holds no prompt")
    return prompts


def block_prompts(blocks: list[Block], prompt_tokens: int) -> list[Prompt]:
    """One prompt per block: its first ``prompt_tokens`` ids, or (chat) the ids before its first
    assistant token."""
    prompts: list[Prompt] = []
    for block in blocks:
        if block.loss_mask is not None:
            first = int(np.argmax(block.loss_mask)) if block.loss_mask.any() else len(block.ids)
            ids = block.ids[: max(first, 1)]
        else:
            ids = block.ids[:prompt_tokens]
        prompts.append(Prompt(len(prompts), ids))
    return prompts


def prompt_indices(n: int, seed: int, rank: int, world: int, per_step: int, k: int) -> list[int]:
    """The prompts worker ``rank`` takes at the ``k``-th (0-based) on-policy step."""
    global_batch = per_step * world
    steps_per_epoch = n // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"prompts: {n} prompts cannot fill one on-policy step of {global_batch} "
            f"(batch_size x grad_accum x workers)"
        )
    epoch, within = divmod(k, steps_per_epoch)
    order = np.random.default_rng([seed, 1, epoch]).permutation(n)  # not the data's order
    base = within * global_batch + rank * per_step
    return order[base : base + per_step].tolist()
