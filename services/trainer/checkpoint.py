"""Training checkpoints: what a checkpoint folder holds, which one to resume, writing and reading.

Layout: ``ddp``: rank 0 writes a Hugging Face model directory (``model/``), ``optimizer.pt``,
``scheduler.pt`` and the data position (``fuseserve_state.json``); ``fsdp``: every rank writes
its shards of model and optimizer with ``torch.distributed.checkpoint`` (``dcp/``) and the last
checkpoint also holds the gathered Hugging Face model (``model/``). Both keep each rank's RNG
state (``rng/rank<r>.pt``). Rank 0 marks a checkpoint ``COMPLETE`` once every rank's upload has
returned, so a folder cut off by a kill is never resumed from.

Leaves out: handing the folder to Ray and the barrier around it (``recipe``), the data order
(a function of the step, ``data.worker_schedule``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from fuseserve.trainer.config import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "fuseserve_state.json"
COMPLETE_FILE = "COMPLETE"


def checkpoint_complete(folder: Path, registered: bool = False) -> bool:
    """All ranks finished writing this checkpoint: rank 0 writes ``COMPLETE`` into it after a
    barrier that follows every rank's upload, so a checkpoint cut off by a kill (some files there,
    some half-copied) is not. ``registered``: Ray's own checkpoint (registered only once every
    rank has reported) and checkpoints from before the marker, for which the files are checked
    instead."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if "world" not in state:  # written before the marker existed (rank 0 alone, DDP)
        registered = True
    if not registered:
        return (folder / COMPLETE_FILE).exists()
    world = int(state.get("world", 0))
    if not all((folder / "rng" / f"rank{r}.pt").exists() for r in range(world)):
        return False
    if state.get("parallel") == "fsdp":
        return (folder / "dcp" / ".metadata").exists() and (folder / "scheduler.pt").exists()
    needed = ("model/config.json", "optimizer.pt", "scheduler.pt")
    return all((folder / n).exists() for n in needed)


def read_state(folder: Path) -> dict:
    """The state file of a checkpoint folder (step, epoch, data fingerprint, parallel, world)."""
    return json.loads((folder / STATE_FILE).read_text())


def find_latest_checkpoint(storage_path: str, name: str) -> Path | None:
    """The complete checkpoint directory with the highest step under ``storage_path/name``."""
    root = Path(storage_path) / name
    best, best_step = None, -1
    if root.exists():
        for state in root.rglob(STATE_FILE):
            folder = state.parent
            if not checkpoint_complete(folder):
                continue
            step = json.loads(state.read_text()).get("step", -1)
            if step > best_step:
                best, best_step = state.parent, step
    return best


def furthest(candidates: list[Path | None]) -> Path | None:
    """The candidate checkpoint with the highest step (None when there is none)."""
    present = [c for c in candidates if c is not None]
    return max(present, key=lambda c: read_state(c)["step"], default=None)


def check_resumable(folder: Path, cfg: TrainConfig, fingerprint: str) -> int:
    """The step to resume at from ``folder``; a clear error when it was written on other data,
    with another ``parallel`` mode or another on-policy share (the prompt position, restored as
    a function of the step, would not be the one the run had reached)."""
    state = read_state(folder)
    if state["data_fingerprint"] != fingerprint:
        raise RuntimeError(f"checkpoint {folder} was trained on other data; use a new run name")
    if state.get("parallel", "ddp") != cfg.parallel:
        raise RuntimeError(
            f"parallel: checkpoint {folder} was written with --parallel "
            f"{state.get('parallel', 'ddp')}; resume with the same mode or a new run name"
        )
    step = int(state["step"])
    if state.get("onpolicy_steps", 0) != cfg.onpolicy_before(step):
        raise RuntimeError(
            f"on_policy: checkpoint {folder} took {state.get('onpolicy_steps', 0)} on-policy "
            f"steps of {step}; --on-policy {cfg.on_policy} would have taken "
            f"{cfg.onpolicy_before(step)} (the prompt and data positions would differ); resume "
            "with the same share or a new run name"
        )
    return step


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole model's state dict on CPU, gathered from the FSDP shards (a collective: every
    rank calls it; ranks other than 0 get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def write_model(out: Path, cfg: TrainConfig, model, tokenizer, rank: int, final: bool) -> None:
    """The Hugging Face model directory ``out/model``: ddp: rank 0, always; fsdp: gathered from
    every rank's shards (a collective), written by rank 0, on the final checkpoint only."""
    if cfg.parallel == "ddp" and rank == 0:
        (model.module if hasattr(model, "module") else model).save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    elif cfg.parallel == "fsdp" and final:
        from transformers import AutoModelForCausalLM

        full = full_model_state(model)  # a collective: every rank gathers
        if rank == 0:
            dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
            plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
            plain.load_state_dict(full)
            plain.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")


def write_checkpoint(out: Path, cfg: TrainConfig, parts, state: dict, rank: int) -> None:
    """This rank's files of one checkpoint into ``out`` (Ray merges the ranks' folders).

    ``parts``: (model, tokenizer, optimizer, scheduler); ``state``: the state file's contents
    (step, epoch, blocks_seen, data_fingerprint, parallel, world, config), written by rank 0."""
    model, tokenizer, optimizer, scheduler = parts
    (out / "rng").mkdir()
    torch.save(rng_state(), out / "rng" / f"rank{rank}.pt")
    if cfg.parallel == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))
    elif rank == 0:
        torch.save(optimizer.state_dict(), out / "optimizer.pt")
    write_model(out, cfg, model, tokenizer, rank, final=state["step"] == cfg.max_steps)
    if rank == 0:
        torch.save(scheduler.state_dict(), out / "scheduler.pt")
        (out / STATE_FILE).write_text(json.dumps(state, indent=1))


def mark_complete(cfg: TrainConfig, dir_name: str, step: int) -> None:
    """Write ``COMPLETE`` into the persisted checkpoint (rank 0, after every rank's upload);
    only a local ``storage_path`` can be marked."""
    if "://" in cfg.storage_path:
        return
    persisted = Path(cfg.storage_path) / cfg.name / dir_name
    if persisted.is_dir():
        (persisted / COMPLETE_FILE).write_text(str(step))
    else:
        log.warning("checkpoint not found at %s: it cannot be resumed from", persisted)


def load_training_state(folder: Path, cfg: TrainConfig, parts, rank: int) -> None:
    """Optimizer (and, for fsdp, model shards), scheduler and this rank's RNG from a checkpoint;
    ``parts``: (model, optimizer, scheduler)."""
    model, optimizer, scheduler = parts
    if cfg.parallel == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        # dcp.load fills the two state dicts in place; each has its own value type
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    else:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng_file = folder / "rng" / f"rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
