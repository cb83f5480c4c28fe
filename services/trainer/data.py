"""Training data: documents from files -> packed blocks of target tokens with their exact text.

Covers reading plain text (one document per file), jsonl (a ``text`` field per line), parquet (a
``text`` column) and datasets saved with ``datasets.save_to_disk``; packing documents into one
stream (joined by a separator) and cutting it into blocks of ``block_size`` target tokens; each
block's text is exactly the characters its tokens cover, so every teacher scores the same
characters; a deterministic epoch order from a seed, sharded across workers by rank.

The ids a block trains on are the target tokenizer's ids *of the block text* (tokenised on its
own, no special tokens, cut to ``block_size``): the same ids the aligner computes, so the trainer
can check the aligner's answer token by token.

Chat data (``read_conversations``, ``chat_blocks``): jsonl with ``messages`` ([{role, content}])
or ``prompt`` / ``response``; each conversation is rendered with the target tokenizer's chat
template (a plain fallback template when it has none) into one block (cut at ``block_size``
tokens), whose ``loss_mask`` [n] marks the tokens inside assistant turns (their content and the
end-of-turn marker the template puts after it). Teachers score the same rendered text.

Leaves out: fused targets (``prefetch``) and the model.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Read when a directory walk finds them (a file named explicitly is read whatever its suffix).
TEXT_SUFFIXES = (
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
    ".js", ".ts", ".java", ".sh", ".tex", ".html", ".css", ".json", ".toml", ".yaml", ".yml",
)  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Block:
    """One training block: its index in the corpus order, its text and its target ids [n];
    ``loss_mask`` [n] bool (chat): the tokens the loss is on (None = all)."""

    index: int
    text: str
    ids: np.ndarray
    loss_mask: np.ndarray | None = None


def read_documents(paths: Sequence[str | Path], field: str = "text") -> list[str]:
    """Documents from files or directories (text, .jsonl, .parquet, or a save_to_disk dataset).

    A file named in ``paths`` is read whatever its suffix (.jsonl and .parquet by their format,
    anything else as UTF-8 text); a directory walk reads the files whose suffix is in
    ``TEXT_SUFFIXES`` (and .jsonl, .parquet, no suffix) and logs a warning counting what it skipped.
    Raises FileNotFoundError for a missing path and ValueError when nothing non-blank is read.
    """
    docs: list[str] = []
    for spec in paths:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory {str(spec)!r}")
        if path.is_dir() and (path / "dataset_info.json").exists():
            from datasets import load_from_disk

            docs.extend(str(t) for t in load_from_disk(str(path))[field] if t)
        elif path.is_dir():
            docs.extend(_read_directory(path, field))
        else:
            docs.extend(_read_file(path, field))
    kept = [d for d in docs if d.strip()]
    if not kept:
        names = ", ".join(str(p) for p in paths) or "(no paths)"
        raise ValueError(f"no text in {names} (empty files or none read)")
    return kept


def _read_directory(folder: Path, field: str) -> list[str]:
    """The readable files under ``folder``, in name order; a warning says what was skipped."""
    docs: list[str] = []
    skipped: Counter[str] = Counter()
    for child in sorted(folder.rglob("*")):
        if not child.is_file():
            continue
        if child.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet", ""):
            docs.extend(_read_file(child, field))
        else:
            skipped[child.suffix or "(no suffix)"] += 1
    if skipped:
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in skipped.most_common())
        log.warning(
            "data: %s: skipped %d files whose suffix is not read in a directory walk (%s); "
            "name a file to read it whatever its suffix",
            folder,
            sum(skipped.values()),
            kinds,
        )
    return docs


def _read_file(path: Path, field: str) -> list[str]:
    """One file: jsonl (``field`` per line), parquet (``field`` column) or UTF-8 text."""
    if path.suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if field not in record:
                        raise ValueError(f"{path}:{n}: no {field!r} field")
                    docs.append(str(record[field]))
        return docs
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [str(t) for t in pq.read_table(path, columns=[field])[field].to_pylist()]
    return [path.read_text(encoding="utf-8", errors="replace")]


def pack_blocks(
    tokenizer, documents: Iterable[str], block_size: int, separator: str = "\n\n"
) -> list[Block]:
    """Cut the packed document stream into blocks of ``block_size`` tokens (the tail is dropped).

    Documents are tokenised one by one (offsets shifted into the stream), so memory stays linear.
    """
    stream_parts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    position = 0
    for doc in documents:
        text = doc + separator
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        for s, e in enc["offset_mapping"]:
            if e > s:
                starts.append(position + s)
                ends.append(position + e)
        stream_parts.append(text)
        position += len(text)
    stream = "".join(stream_parts)
    blocks: list[Block] = []
    for b in range(len(starts) // block_size):
        lo, hi = b * block_size, (b + 1) * block_size - 1
        text = stream[starts[lo] : ends[hi]]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:block_size]
        if len(ids) >= 2:
            blocks.append(Block(len(blocks), text, np.asarray(ids, dtype=np.int64)))
    return blocks


# Used when the target tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def read_conversations(paths: Sequence[str | Path]) -> list[list[dict[str, str]]]:
    """Conversations from chat jsonl files (or directories of them): each line has ``messages``
    ([{"role", "content"}], roles system/user/assistant) or ``prompt`` and ``response``."""
    conversations: list[list[dict[str, str]]] = []
    for spec in paths:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory {spec!r}")
        files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            with file.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if "messages" in record:
                        messages = record["messages"]
                        ok = isinstance(messages, list) and all(
                            isinstance(m, dict) and {"role", "content"} <= m.keys()
                            for m in messages
                        )
                        if not ok:
                            raise ValueError(
                                f"{file}:{n}: messages must be a list of {{role, content}}"
                            )
                        msgs = [{"role": m["role"], "content": str(m["content"])} for m in messages]
                    elif "prompt" in record and "response" in record:
                        msgs = [
                            {"role": "user", "content": str(record["prompt"])},
                            {"role": "assistant", "content": str(record["response"])},
                        ]
                    else:
                        raise ValueError(
                            f"{file}:{n}: a chat line needs 'messages' or 'prompt' and 'response'"
                        )
                    if any(m["role"] == "assistant" for m in msgs):
                        conversations.append(msgs)
    if not conversations:
        names = ", ".join(str(p) for p in paths) or "(no paths)"
        raise ValueError(f"no conversation with an assistant turn in {names}")
    return conversations


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant spans): the conversation rendered with the tokenizer's chat template and
    the character ranges [start, end) of its assistant turns (content plus the end-of-turn marker
    the template writes after it). A turn starts where the conversation before it, rendered with
    the generation prompt, ends."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE

    def render(msgs, prompt):
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=prompt, chat_template=template
        )

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True) if i else ""
        upto = render(messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise ValueError(
                "chat: the chat template does not render a conversation as a prefix of its "
                "continuation; cannot locate the assistant turns"
            )
        start = len(before)
        if m["content"] and not text.startswith(m["content"], start):
            found = text.find(m["content"], start, len(upto))  # text the template put before it
            start = found if found >= 0 else start
        spans.append((start, len(upto)))
    return text, spans


def chat_blocks(tokenizer, conversations: Iterable[list[dict[str, str]]], block_size: int):
    """One block per conversation (cut at ``block_size`` tokens) with its assistant-token mask."""
    blocks: list[Block] = []
    for messages in conversations:
        rendered, spans = render_chat(tokenizer, messages)
        enc = tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=False)
        offsets = enc["offset_mapping"][:block_size]
        if len(offsets) < 2:
            continue
        text = rendered[: offsets[-1][1]]
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = np.asarray(enc["input_ids"][:block_size], dtype=np.int64)
        starts = [s for s, _ in enc["offset_mapping"][:block_size]]
        mask = np.array([any(a <= s < b for a, b in spans) for s in starts], dtype=bool)
        if len(ids) >= 2 and mask[1:].any():
            blocks.append(Block(len(blocks), text, ids, mask))
    return blocks


def epoch_order(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of block indices, the same for every worker."""
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def worker_schedule(
    num_blocks: int, seed: int, rank: int, world: int, batch_size: int, start_step: int = 0
):
    """Yield (step, epoch, [block indices]) for this worker from ``start_step`` on, forever.

    Every step takes ``batch_size * world`` consecutive blocks of the epoch order; worker ``rank``
    gets its slice. Epochs end where a full global batch no longer fits.
    """
    global_batch = batch_size * world
    steps_per_epoch = num_blocks // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"data: {num_blocks} blocks cannot fill one global batch of {global_batch} "
            f"(batch_size {batch_size} x {world} workers)"
        )
    step = start_step
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        order = epoch_order(num_blocks, seed, epoch)
        base = within * global_batch + rank * batch_size
        yield step, epoch, order[base : base + batch_size].tolist()
        step += 1


def build_blocks(cfg, tokenizer) -> list[Block]:
    """The run's blocks from its settings (a ``TrainConfig``): chat blocks with ``cfg.chat``,
    else packed documents; the same list on every worker."""
    if cfg.chat:
        return chat_blocks(tokenizer, read_conversations(cfg.data), cfg.block_size)
    return pack_blocks(tokenizer, read_documents(cfg.data, cfg.data_field), cfg.block_size)


def data_fingerprint(blocks: list[Block]) -> str:
    """A short hash of the blocks' texts in order: a checkpoint resumes only on the same data."""
    import hashlib

    h = hashlib.sha256()
    for b in blocks:
        h.update(b.text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def read_domains(specs: Sequence[str], chat: bool = False) -> dict[str, list]:
    """``domain=path[,path]`` specs -> each domain's documents (its conversations with
    ``chat``); ``ValueError`` naming the spec or the domain."""
    domains: dict[str, list] = {}
    for spec in specs:
        name, sep, paths = spec.partition("=")
        if not sep or not paths:
            raise ValueError(f"data: expected domain=path[,path], got {spec!r}")
        try:
            read = read_conversations if chat else read_documents
            domains[name] = read(paths.split(","))
        except (FileNotFoundError, ValueError) as exc:
            kind = " (--chat)" if chat else ""
            raise ValueError(f"data{kind}: domain {name!r}: {exc}") from None
    return domains


def check_training_data(cfg) -> None:
    """Read a training run's ``data`` and ``eval_data`` once, before Ray starts, so a missing
    path or an empty data set is one ``ValueError`` naming the field, not a traceback from a
    worker."""
    from fuseserve.trainer.heldout import HeldOut

    try:
        if cfg.chat:
            read_conversations(cfg.data)
        else:
            read_documents(cfg.data, cfg.data_field)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"data: {exc}") from None
    try:
        HeldOut.load(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(str(exc)) from None
