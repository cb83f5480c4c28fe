"""Sampling the student's completions for on-policy steps, with transformers' ``generate``.

Covers one batched ``generate`` call over a list of prompts: prompts left-padded (so every row's
last prompt token sits at the same column and the KV cache is one tensor), ``do_sample`` with the
run's temperature and top-p (no top-k), at least one and at most ``max_new_tokens`` new tokens,
the KV cache on. Sampling is seeded from (seed, step, rank, call) inside a forked RNG, so the
same step samples the same completions in a resumed run and the training RNG (dropout) is left
untouched. The wrapped model is unwrapped for DDP (``module``); an FSDP2 model generates as it is,
every rank together (``synced_gpus``: a rank whose rows have all stopped keeps stepping until
every rank has, since each forward gathers the sharded layers from all ranks). A completion ends
before the first end-of-sequence token: teachers judge text, and the EOS token has none.

Shapes: prompts are lists of 1-D id arrays; completions likewise (the new ids only).

Leaves out: which prompts (``prompts``), judging and training on completions (``onpolicy``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch


class _Generates(Protocol):
    """A Hugging Face model's ``generate`` (nn.Module's __getattr__ hides it from the checker)."""

    def generate(self, **kwargs: Any) -> torch.Tensor: ...


def sampling_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A 63-bit seed for one ``generate`` call (``micro``: the call's number within the step), a
    pure function of where it is in the run."""
    state = np.random.SeedSequence([seed, step, rank, micro, 0x0F]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def left_pad(prompts: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, longest prompt], padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


def cut_at_eos(row: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """The new ids before the first end-of-sequence id."""
    stops = np.flatnonzero(np.isin(row, list(eos_ids)))
    return row[: stops[0]] if len(stops) else row


def generation_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``generate`` to call: DDP's inner model; an FSDP2 model itself."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def eos_ids_of(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every end-of-sequence id the model's generation config or the tokenizer names."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[np.ndarray],
    settings,
    device: torch.device,
    pad_id: int,
    eos_ids: Sequence[int],
    seed: int,
    synced: bool = False,
) -> list[np.ndarray]:
    """One completion per prompt; ``settings`` is the run's ``TrainConfig`` (sampling fields)."""
    gen = cast(_Generates, generation_model(model))
    ids, mask = left_pad(prompts, pad_id)
    fork = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=fork), _autocast(settings, device):
            torch.manual_seed(seed)
            out = gen.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=settings.sampling_temperature,
                top_p=settings.top_p,
                top_k=0,
                min_new_tokens=1,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=list(eos_ids) or None,
                use_cache=True,
                synced_gpus=synced,
            )
    finally:
        model.train(was_training)
    new = out[:, ids.shape[1] :].cpu().numpy().astype(np.int64)
    return [cut_at_eos(row, eos_ids) for row in new]


def _autocast(settings, device: torch.device):
    if settings.mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
