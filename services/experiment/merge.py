"""The weight-merging baseline: the uniform average of the sources' parameters (a linear merge,
as in "model soups"), for sources that share one architecture, shape and tokenizer.

Leaves out: task arithmetic, TIES or other weighted merges; merging across architectures (it has
no meaning there, so it is refused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Parameter-wise mean of state dicts with the same keys and shapes (floats averaged in fp32,
    anything else must be equal and is kept)."""
    import torch

    if not state_dicts:
        raise ValueError("state_dicts: nothing to merge")
    keys = list(state_dicts[0])
    out: dict[str, torch.Tensor] = {}
    for i, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys:
            missing = set(keys) ^ set(sd)
            raise ValueError(f"model {i}: other parameters than model 0 ({sorted(missing)[:3]})")
    for key in keys:
        tensors = [sd[key] for sd in state_dicts]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"{key}: shapes differ between models {sorted(shapes)}")
        if tensors[0].is_floating_point():
            mean = torch.stack([t.float() for t in tensors]).mean(0)
            out[key] = mean.to(tensors[0].dtype)
        else:
            if not all(torch.equal(tensors[0], t) for t in tensors[1:]):
                raise ValueError(f"{key}: non-float buffers differ between models")
            out[key] = tensors[0]
    return out


def merge_models(model_dirs: Sequence[str], out_dir: str | Path) -> Path:
    """Average the weights of Hugging Face model directories into ``out_dir`` (with the first
    model's config and tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [AutoModelForCausalLM.from_pretrained(d) for d in model_dirs]
    configs = [m.config.to_diff_dict() for m in models]
    for c in configs:
        c.pop("_name_or_path", None)
    for d, c in zip(model_dirs[1:], configs[1:]):
        if c != configs[0]:
            diff = sorted(k for k in set(c) | set(configs[0]) if c.get(k) != configs[0].get(k))
            raise ValueError(f"merge: {d} has another configuration than {model_dirs[0]} ({diff})")
    tokenizers = [AutoTokenizer.from_pretrained(d) for d in model_dirs]
    if any(t.get_vocab() != tokenizers[0].get_vocab() for t in tokenizers[1:]):
        raise ValueError("merge: the models use different tokenizers")
    merged = models[0]
    merged.load_state_dict(average_state_dicts([m.state_dict() for m in models]))
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    merged.save_pretrained(tmp)
    tokenizers[0].save_pretrained(tmp)
    tmp.rename(out)
    return out
