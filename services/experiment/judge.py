"""Teacher-judged quality of a model's own completions (how on-policy distillation is measured).

Covers: held-out prompts (windows of ``prompt_tokens`` target tokens cut from each domain's test
texts, ``prompts_per_domain`` per domain, evenly spaced); one sampled completion per prompt from
the model under test (``trainer.generation``, the same seed for every model, so models differ
only by what they learned); the completions scored through the running aligner *as ids*
(the prompt + completion ids, the ``judge`` preset, ``spans`` by default): the chain-rule
probability q(x_t) the aligner gives each completion token, asked once per teacher (``teachers``
= that one) and once with every source (fused). Reported per model: bits per UTF-8 byte of the
completions under each judge, Σ −log2 q(x_t) / completion bytes (bytes = those the completion
adds to the decoded prompt), distinct-2 (distinct token bigrams over all bigrams of all
completions: a model that collapses into repetition scores low) and the mean completion length.

Leaves out: training the models, the report.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

FUSED = "fused"
REQUEST_BATCH = 8  # sequences per fuse request


def heldout_prompts(texts: dict[str, list[str]], tokenizer, judge) -> list[np.ndarray]:
    """``prompts_per_domain`` windows of ``prompt_tokens`` ids per domain, evenly spaced."""
    prompts = []
    for domain, docs in texts.items():
        ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
        span = judge.prompt_tokens + judge.max_new_tokens
        room = len(ids) - span
        if room < 0:
            raise ValueError(f"judge: domain {domain!r} has only {len(ids)} test tokens")
        for s in np.linspace(0, room, judge.prompts_per_domain).astype(int):
            prompts.append(np.asarray(ids[s : s + judge.prompt_tokens], dtype=np.int64))
    return prompts


def complete(spec: str, tokenizer, prompts: list[np.ndarray], judge) -> list[np.ndarray]:
    """One sampled completion per prompt from the model ``spec`` (CPU, batches of 8)."""
    import torch

    from fuseserve.loading import load_causal_lm
    from fuseserve.trainer.generation import eos_ids_of, sample_completions, sampling_seed

    model = load_causal_lm(spec)
    settings = SimpleNamespace(
        sampling_temperature=judge.sampling_temperature,
        top_p=judge.top_p,
        max_new_tokens=judge.max_new_tokens,
        mixed_precision="no",
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos, out = eos_ids_of(model, tokenizer), []
    for b in range(0, len(prompts), 8):
        seed = sampling_seed(judge.seed, b, 0, 0)
        part = prompts[b : b + 8]
        out += sample_completions(model, part, settings, torch.device("cpu"), pad, eos, seed)
    return out


def completion_bytes(tokenizer, prompt: np.ndarray, completion: np.ndarray) -> int:
    """UTF-8 bytes the completion adds to the decoded prompt."""
    whole = tokenizer.decode(np.concatenate([prompt, completion]).tolist())
    return len(whole.encode("utf-8")) - len(tokenizer.decode(prompt.tolist()).encode("utf-8"))


def sampled_nll(block, prompt_len: int, n: int) -> float:
    """Σ −ln q(x_t) over positions t ≥ ``prompt_len`` of one fused block of ``n`` ids (row
    t − 1 holds x_t with its chain-rule probability; an unlisted x_t takes the tail mass)."""
    total = 0.0
    for t in range(prompt_len, n):
        row, token = t - 1, int(block.target_ids[t])
        hit = block.ids[row] == token
        q = float(block.probs[row][hit].sum()) if hit.any() else float(block.tail[row])
        total -= math.log(max(q, 1e-8))
    return total


def judge_nll(address: str, sequences, prompt_lens, teachers: Sequence[str], preset: str, k: int):
    """Σ −ln q over every sequence's completion, judged by ``teachers`` (empty = all)."""
    from fuseserve.client import FuseParams, GrpcClient

    params = FuseParams(k=k, preset=preset, teachers=tuple(teachers), float_dtype="f32")
    total = 0.0
    with GrpcClient(address, timeout_s=600) as client:
        for b in range(0, len(sequences), REQUEST_BATCH):
            part = [s.tolist() for s in sequences[b : b + REQUEST_BATCH]]
            reply = client.fuse(None, params, token_ids=part)
            for block, seq, p in zip(reply.blocks, part, prompt_lens[b : b + REQUEST_BATCH]):
                total += sampled_nll(block.block, p, len(seq))
    return total


def distinct_2(completions: list[np.ndarray]) -> float:
    """Distinct token bigrams / all bigrams, over every completion (nan without bigrams)."""
    bigrams = [(int(a), int(b)) for c in completions for a, b in itertools.pairwise(c)]
    return len(set(bigrams)) / len(bigrams) if bigrams else math.nan


@dataclass
class Judged:
    bpb: dict[str, float]  # judge (a teacher, or "fused") -> bits per byte of the completions
    distinct2: float
    completion_len: float


def judge_model(spec, tokenizer, texts, address: str, sources: list[str], judge, k: int):
    """Judge the model ``spec``'s completions of the held-out prompts (see the module doc)."""
    prompts = heldout_prompts(texts, tokenizer, judge)
    completions = complete(spec, tokenizer, prompts, judge)
    sequences = [np.concatenate([p, c]) for p, c in zip(prompts, completions)]
    lens = [len(p) for p in prompts]
    n_bytes = sum(completion_bytes(tokenizer, p, c) for p, c in zip(prompts, completions))
    from tqdm.auto import tqdm

    bpb = {}
    judges = [*((s, [s]) for s in sources), (FUSED, [])]
    for name, teachers in tqdm(judges, desc="judges", unit="judge", leave=False):
        nll = judge_nll(address, sequences, lens, teachers, judge.preset, k)
        bpb[name] = nll / math.log(2) / max(n_bytes, 1)
    mean_len = sum(len(c) for c in completions) / len(completions)
    return Judged(bpb, distinct_2(completions), mean_len)
