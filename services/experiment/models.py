"""The models an experiment starts from: initialised, trained with CLM, or given; cached by content.

Covers building a fresh model on a real tokenizer (Llama or GPT-NeoX), training it (or continuing
another model) with plain CLM on a corpus split in this process, and the content-addressed
folder cache: a model's key hashes its recipe, its parent's key and the training text, so a
changed recipe or corpus gives a new folder and an unchanged one is reused, never retrained.
Sources are inputs of an experiment, as the paper's source models are, so they train here in
one process (seconds to minutes), not as Ray jobs; the target's runs are the experiment.

Leaves out: the target's training runs (``runner``), weight merging (``merge``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from fuseserve.experiment.config import ExperimentConfig, InitConfig, ModelConfig, SourceTraining
from fuseserve.experiment.corpus import Corpus

RECIPE_VERSION = 1


@dataclass(frozen=True)
class PreparedModel:
    """A model ready to load: ``spec`` is what teachers, the trainer and eval accept."""

    name: str
    spec: str
    key: str
    tokenizer: str  # tokenizer spec


def build_model(init: InitConfig, tokenizer):
    """A freshly initialised causal LM sized to ``tokenizer`` (weights from ``init.seed``)."""
    import torch

    if init.architecture == "llama":
        from fuseserve.teacher.tiny import build_tiny_llama

        return build_tiny_llama(
            tokenizer, seed=init.seed, hidden=init.hidden, layers=init.layers, heads=init.heads
        )
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=init.hidden,
        intermediate_size=4 * init.hidden,
        num_hidden_layers=init.layers,
        num_attention_heads=init.heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(init.seed)
    return GPTNeoXForCausalLM(config).eval()


def train_clm(model, tokenizer, files: list[Path], train: SourceTraining, desc: str):
    """Plain CLM training in this process (AdamW, cosine schedule with 5% warm-up, clipping)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from fuseserve.trainer.data import pack_blocks, read_documents, worker_schedule
    from fuseserve.trainer.loss import clm_loss
    from fuseserve.trainer.step import batch_tensors

    blocks = pack_blocks(tokenizer, read_documents(files), train.block_size)
    batch = min(train.batch_size, len(blocks))
    schedule = worker_schedule(len(blocks), train.seed, 0, 1, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, train.steps // 20), train.steps)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(train.seed)
    model.train()
    with tqdm(range(train.steps), desc=desc, unit="step") as bar:
        for _ in bar:
            _, _, idxs = next(schedule)
            ids, mask, labels, *_ = batch_tensors([blocks[i] for i in idxs], None, pad)
            loss = clm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def model_key(cfg: ExperimentConfig, name: str, corpus: Corpus, keys: dict[str, str]) -> str:
    """Content key of one model's recipe (parent's key and training text included)."""
    model = cfg.models[name]
    recipe = {
        "version": RECIPE_VERSION,
        "model": model.model_dump(mode="json", by_alias=True),
        "parent": keys.get(model.from_) if model.from_ else None,
        "corpus": corpus.fingerprint if model.train else None,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def prepare_models(cfg: ExperimentConfig, corpus: Corpus, cache: Path) -> dict[str, PreparedModel]:
    """Every model of the file, parents first."""
    order: list[str] = []

    def visit(name: str) -> None:
        parent = cfg.models[name].from_
        if parent:
            visit(parent)
        if name not in order:
            order.append(name)

    for name in cfg.models:
        visit(name)
    keys: dict[str, str] = {}
    out: dict[str, PreparedModel] = {}
    for name in order:
        model = cfg.models[name]
        if model.spec is not None:
            keys[name] = model_key(cfg, name, corpus, keys)
            out[name] = PreparedModel(name, model.spec, keys[name], model.spec)
            continue
        keys[name] = model_key(cfg, name, corpus, keys)
        folder = cache / f"{name}-{keys[name]}"
        tokenizer_spec = _root_tokenizer(cfg, name)
        if not (folder / "config.json").exists():
            _make(cfg, name, model, corpus, folder, out, tokenizer_spec)
        out[name] = PreparedModel(name, str(folder), keys[name], str(folder))
    return {n: out[n] for n in order}


def _root_tokenizer(cfg: ExperimentConfig, name: str) -> str:
    root_name = cfg.root(name)
    root = cfg.models[root_name]
    if root.init is not None:
        return root.init.tokenizer
    if root.spec is None:  # ModelConfig's validator gives a model without `from` spec or init
        raise ValueError(f"models.{root_name}: neither spec nor init")
    return root.spec


def _make(cfg, name: str, model: ModelConfig, corpus: Corpus, folder: Path, ready, tok_spec):
    from fuseserve.loading import load_tokenizer

    tokenizer = load_tokenizer(tok_spec)
    if model.init is not None:
        net = build_model(model.init, tokenizer)
    else:
        from fuseserve.loading import load_causal_lm

        net = load_causal_lm(ready[model.from_].spec)
    if model.train is not None:
        split, _, domain = model.train.data.partition(":")
        files = corpus.files(split, domain or None)
        net = train_clm(net, tokenizer, files, model.train, f"train source {name}")
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    net.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(
        json.dumps(model.model_dump(mode="json", by_alias=True), indent=1)
    )
    tmp.rename(folder)
