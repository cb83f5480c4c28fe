"""Tiny real causal LMs for fast tests and benchmarks: a transformers config + a real tokenizer.

Covers building a small ``LlamaForCausalLM`` (random weights from a fixed seed) sized to a real
tokenizer's vocabulary and saving it with its tokenizer as a normal Hugging Face directory, which
every loader in fuseserve accepts like any other model.

Ships with the package (not only in tests/): ``fuseserve experiment`` builds its llama source
models with ``build_tiny_llama`` at run time (``experiment.models``).

Leaves out: training (the demo trains its small source model itself).
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return model


def save_tiny_llama(tokenizer, directory: str | Path, seed: int = 0, **sizes) -> Path:
    """Build and save a tiny model plus its tokenizer into ``directory`` (returned)."""
    directory = Path(directory)
    model = build_tiny_llama(tokenizer, seed=seed, **sizes)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
