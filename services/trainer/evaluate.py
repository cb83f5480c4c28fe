"""Bits per UTF-8 byte (BPB) of any causal LM on held-out text, so different tokenizers compare.

BPB = (Σ −log₂ p(token)) / (number of UTF-8 bytes those tokens cover). Each text is cut into
windows of at most ``max_length`` tokens; every window starts with the model's BOS when it has
one, so every token (and every byte) of the text is predicted. A tokenizer without BOS cannot
predict a window's first token: its bytes are left out of the count (stated in the result).

Response-only BPB (chat data): each conversation is rendered with the model's own chat template;
the bits are those of every token inside the assistant turns (their content and the end-of-turn
marker, so stopping is paid for), the bytes those of the assistant contents alone, so models with
different templates and tokenizers compare on the same bytes.

Models load through ``fuseserve.loading.load_model``, the path ``fuseserve train`` takes too.

Leaves out: training; choosing the held-out text (``fuseserve.demo`` builds one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from fuseserve.batching import pad_ids


@dataclass(frozen=True)
class BPB:
    bits: float
    bytes: int
    tokens: int
    unpredicted_bytes: int = 0

    @property
    def value(self) -> float:
        """Bits per byte; NaN when no byte was scored (never a silent 0)."""
        return self.bits / self.bytes if self.bytes else math.nan


@dataclass(frozen=True)
class ScoredText:
    """One text scored token by token.

    ids: [n] the text's token ids (no special tokens); offsets: [n, 2] their character offsets;
    logprobs: [n] natural-log probability of each token given the text before it in its window
    (NaN for a window's first token when the tokenizer has no BOS to predict it from).
    """

    text: str
    ids: np.ndarray
    offsets: np.ndarray
    logprobs: np.ndarray


@torch.no_grad()  # not inference_mode: FSDP2 would keep inference tensors as buffers
def score_texts(
    model,
    tokenizer,
    texts: Iterable[str],
    max_length: int = 1024,
    batch_size: int = 4,
    progress=None,
) -> list[ScoredText]:
    """Every token's log-probability, in windows of at most ``max_length`` tokens (BOS first)."""
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    step = max_length - 1 if bos is not None else max_length
    encoded, windows = [], []  # windows: (text index, first token, ids with BOS)
    for text in texts:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if not len(ids):
            continue
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        encoded.append((text, ids, offsets, np.full(len(ids), np.nan)))
        for a in range(0, len(ids), step):
            chunk = ids[a : a + step].tolist()
            windows.append((len(encoded) - 1, a, [bos, *chunk] if bos is not None else chunk))
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        batch_ids, mask = pad_ids([w for _, _, w in batch])
        batch_ids, mask = batch_ids.to(device), mask.to(device)
        logits = model(input_ids=batch_ids, attention_mask=mask).logits[:, :-1].float()
        picked = torch.log_softmax(logits, -1).gather(-1, batch_ids[:, 1:, None])
        logp = picked[..., 0].cpu().numpy()
        for r, (t, a, w) in enumerate(batch):
            predicted = len(w) - 1  # tokens predicted in this window
            first = a if bos is not None else a + 1
            encoded[t][3][first : first + predicted] = logp[r, :predicted]
        if progress is not None:
            progress(len(batch))
    return [ScoredText(*e) for e in encoded]


def bits_per_byte(
    model,
    tokenizer,
    texts: Iterable[str],
    max_length: int = 1024,
    batch_size: int = 4,
    progress=None,
) -> BPB:
    scored = score_texts(model, tokenizer, texts, max_length, batch_size, progress)
    bits, total_bytes, unpredicted, tokens = 0.0, 0, 0, 0
    for s in scored:
        total_bytes += len(s.text.encode("utf-8"))
        known = ~np.isnan(s.logprobs)
        bits += float(-s.logprobs[known].sum()) / math.log(2)
        tokens += int(known.sum())
        for i in np.nonzero(~known)[0]:
            a, b = s.offsets[i]
            unpredicted += len(s.text[a:b].encode("utf-8"))
    return BPB(bits, total_bytes - unpredicted, tokens, unpredicted)


def response_bits_per_byte(
    model,
    tokenizer,
    conversations: Iterable[list[dict[str, str]]],
    max_length: int = 1024,
    batch_size: int = 4,
) -> BPB:
    """BPB of the assistant turns only: bits of the tokens that start inside an assistant span of
    the rendered conversation over the UTF-8 bytes of the assistant contents."""
    from fuseserve.trainer.data import render_chat

    rendered, spans, content_bytes = [], [], 0
    for messages in conversations:
        text, turns = render_chat(tokenizer, messages)
        rendered.append(text)
        spans.append(turns)
        content_bytes += sum(
            len(m["content"].encode("utf-8")) for m in messages if m["role"] == "assistant"
        )
    scored = score_texts(model, tokenizer, rendered, max_length, batch_size)
    bits, tokens, unpredicted = 0.0, 0, 0
    for s, turns in zip(scored, spans):
        for i, (a, b) in enumerate(s.offsets):
            if not any(lo <= a < hi for lo, hi in turns):
                continue
            if np.isnan(s.logprobs[i]):
                unpredicted += len(s.text[a:b].encode("utf-8"))
            else:
                bits += float(-s.logprobs[i]) / math.log(2)
                tokens += 1
    return BPB(bits, content_bytes, tokens, unpredicted)


def evaluate_domains(
    model_spec: str,
    domains: Mapping[str, list[str] | list[list[dict[str, str]]]],
    max_length: int = 1024,
    tokenizer_spec: str | None = None,
    show_progress: bool = True,
    chat: bool = False,
) -> dict[str, BPB]:
    """BPB per domain for one model spec (directory, hub id, .gguf or shipped:smollm2);
    ``chat``: domains hold conversations and the BPB is response-only."""
    from tqdm.auto import tqdm

    from fuseserve.loading import load_model

    empty = [d for d, texts in domains.items() if not any(_has_text(t) for t in texts)]
    if empty:
        raise ValueError(f"domains {empty}: no text to score")
    model, tokenizer = load_model(model_spec, tokenizer_spec)
    model.eval()
    out = {}
    for domain, texts in domains.items():
        # ``chat`` says which of the two kinds of list every domain holds
        if chat:
            conversations = cast("list[list[dict[str, str]]]", texts)
            out[domain] = response_bits_per_byte(model, tokenizer, conversations, max_length)
            continue
        documents = cast("list[str]", texts)
        label = f"BPB {model_spec.rstrip('/').split('/')[-1]} [{domain}]"
        with tqdm(desc=label, unit="window", disable=not show_progress) as bar:
            out[domain] = bits_per_byte(
                model, tokenizer, documents, max_length, progress=bar.update
            )
    return out


def _has_text(item: str | list[dict[str, str]]) -> bool:
    """A document with a non-blank character, or a conversation with an assistant turn."""
    if isinstance(item, str):
        return bool(item.strip())
    return any(m.get("role") == "assistant" and m.get("content", "").strip() for m in item)


def markdown_table(rows: Mapping[str, Mapping[str, float]], domains: Sequence[str]) -> str:
    """Bits per byte by model (rows) and domain (columns), as a Markdown table."""
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for model, row in rows.items():
        lines.append(f"| {model} | " + " | ".join(f"{row[d]:.4f}" for d in domains) + " |")
    return "\n".join(lines)
