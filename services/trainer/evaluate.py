"""Bits per UTF-8 byte (BPB) of any causal LM on held-out text, so different tokenizers compare.

BPB = (Σ −log₂ p(token)) / (number of UTF-8 bytes those tokens cover). Each text is cut into
windows of at most ``max_length`` tokens; every window starts with the model's BOS when it has
one, so every token (and every byte) of the text is predicted. A tokenizer without BOS cannot
predict a window's first token: its bytes are left out of the count (stated in the result).

Leaves out: training; choosing the held-out text (``fuseserve.demo`` builds one).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BPB:
    bits: float
    bytes: int
    tokens: int
    unpredicted_bytes: int = 0

    @property
    def value(self) -> float:
        return self.bits / max(self.bytes, 1)


@torch.inference_mode()
def bits_per_byte(
    model,
    tokenizer,
    texts: Iterable[str],
    max_length: int = 1024,
    batch_size: int = 4,
    progress=None,
) -> BPB:
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id
    windows: list[list[int]] = []
    total_bytes = 0
    unpredicted = 0
    step = max_length - 1 if bos is not None else max_length
    for text in texts:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if not ids:
            continue
        total_bytes += len(text.encode("utf-8"))
        for a in range(0, len(ids), step):
            chunk = ids[a : a + step]
            if bos is not None:
                windows.append([bos, *chunk])
            else:
                windows.append(chunk)
                s, e = offsets[a]
                unpredicted += len(text[s:e].encode("utf-8"))
    bits, tokens = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        length = max(len(w) for w in batch)
        ids = torch.zeros((len(batch), length), dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for r, w in enumerate(batch):
            ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        bits += float(-(logp * keep).sum()) / math.log(2)
        tokens += int(keep.sum())
        if progress is not None:
            progress(len(batch))
    return BPB(bits, total_bytes - unpredicted, tokens, unpredicted)


def evaluate_domains(
    model_spec: str,
    domains: Mapping[str, list[str]],
    max_length: int = 1024,
    tokenizer_spec: str | None = None,
    show_progress: bool = True,
) -> dict[str, BPB]:
    """BPB per domain for one model spec (directory, hub id, .gguf or shipped:smollm2)."""
    from tqdm.auto import tqdm

    from fuseserve.teacher.hf_backend import HFBackend

    backend = HFBackend.load(model_spec, tokenizer_spec=tokenizer_spec, device="cpu")
    model, tokenizer = backend.model, backend.tokenizer
    model.eval()
    out = {}
    for domain, texts in domains.items():
        label = f"BPB {model_spec.rstrip('/').split('/')[-1]} [{domain}]"
        with tqdm(desc=label, unit="window", disable=not show_progress) as bar:
            out[domain] = bits_per_byte(model, tokenizer, texts, max_length, progress=bar.update)
    return out
