"""The ensemble baseline: the average of several models' next-token probabilities, in bits.

With one shared tokenizer, the ensemble's probability of token ``t`` is the plain average
``(1/K) Σ_k p_k(t | context)``, exactly. With different tokenizers there is no shared token to
average over, so we group the text into *chunks* between byte positions where every tokenizer
ends a token, and average each model's probability of the whole chunk (the product of its
token probabilities inside it): ``p(chunk) = (1/K) Σ_k Π_{t in chunk} p_k(t | context)``. With
identical tokenizers every chunk is one token, so this is the same definition. (Chunk bounds
depend on where the tokenizers cut the actual text, so with different tokenizers it is an
approximation of a normalised model, not a proof of one.)

Covers the arithmetic on per-token log-probabilities and byte ends (pure numpy), and scoring the
held-out text with real models for it.

Leaves out: loading text (``corpus``), other baselines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def chunk_logprobs(logprobs: Sequence[np.ndarray], ends: Sequence[np.ndarray]) -> np.ndarray:
    """[chunks, K] log-probability of each chunk under each model.

    logprobs[k]: [n_k] natural-log probability of model k's tokens; ends[k]: [n_k] the byte
    offset where each of those tokens ends (increasing). Chunk bounds are the byte ends that all
    models share; the last one is where the text ends for every model.
    """
    if not logprobs or len(logprobs) != len(ends):
        raise ValueError("logprobs and ends: one array per model, at least one model")
    common = set(np.asarray(ends[0]).tolist())
    for e in ends[1:]:
        common &= set(np.asarray(e).tolist())
    finals = {int(e[-1]) for e in ends if len(e)}
    if len(finals) != 1 or finals.pop() not in common:
        raise ValueError("ends: the models' tokens do not cover the same text")
    bounds = np.array(sorted(common), dtype=np.int64)
    out = np.zeros((len(bounds), len(logprobs)))
    for k, (lp, e) in enumerate(zip(logprobs, ends)):
        lp = np.asarray(lp, dtype=np.float64)
        if np.isnan(lp).any():
            raise ValueError(f"logprobs[{k}]: unpredicted tokens (a model without BOS)")
        chunk = np.searchsorted(bounds, np.asarray(e), side="left")
        np.add.at(out[:, k], chunk, lp)
    return out


def ensemble_bits(chunks: np.ndarray) -> float:
    """Bits of the text under the uniform average of the models: chunks [C, K] log-probs."""
    k = chunks.shape[1]
    top = chunks.max(axis=1, keepdims=True)
    mixed = top[:, 0] + np.log(np.exp(chunks - top).sum(axis=1)) - math.log(k)
    return float(-mixed.sum() / math.log(2))


def ensemble_bpb(
    model_specs: Sequence[str], domains: Mapping[str, list[str]], max_length: int = 512
) -> dict[str, float]:
    """Held-out bits per byte of the ensemble of ``model_specs``, per domain."""
    from tqdm.auto import tqdm

    from fuseserve.aligner.tokenview import TokenizerView, context_ends
    from fuseserve.loading import load_model
    from fuseserve.trainer.evaluate import score_texts

    texts = [(d, t) for d, ts in domains.items() for t in ts]
    per_model = []
    for spec in model_specs:
        model, tokenizer = load_model(spec)
        model.eval()
        view = TokenizerView.from_hf(tokenizer, spec)
        with tqdm(desc=f"ensemble: score {spec.rstrip('/').split('/')[-1]}", unit="window") as bar:
            scored = score_texts(model, tokenizer, [t for _, t in texts], max_length, 4, bar.update)
        per_model.append(
            [(s.logprobs, context_ends(s.ids, s.offsets, s.text, view)) for s in scored]
        )
        del model
    bits: dict[str, float] = dict.fromkeys(domains, 0.0)
    nbytes: dict[str, int] = dict.fromkeys(domains, 0)
    for i, (domain, text) in enumerate(texts):
        chunks = chunk_logprobs([m[i][0] for m in per_model], [m[i][1] for m in per_model])
        bits[domain] += ensemble_bits(chunks)
        nbytes[domain] += len(text.encode("utf-8"))
    return {d: bits[d] / max(nbytes[d], 1) for d in domains}
