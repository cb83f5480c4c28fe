"""Trainer settings: env prefix ``FUSESERVE_TRAIN_``, an optional YAML file, CLI flags.

Defaults follow the FuseLLM paper's training setup: λ = 0.9, AdamW β = (0.9, 0.95), weight decay
0.1, gradient clipping 1.0, cosine schedule with warm-up ratio 0.008, lr 1e-5, blocks of 2048
tokens with packing, soft cross-entropy fusion loss, T = 1. ``aligner`` unset (or λ = 1) trains
with CLM only.

Leaves out: the alignment/fusion options (the aligner owns them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fuseserve.config_file import load_settings_file
from fuseserve.trainer.loss_kind import FusionLoss, OnPolicyLoss


class TrainConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FUSESERVE_TRAIN_", extra="forbid")

    model: str = Field(
        description="target model to start from: a local directory, a .gguf file, "
        "shipped:smollm2 or a hub id (what fuseserve eval --model accepts)"
    )
    tokenizer: str | None = Field(None, description="target tokenizer spec (default: model's)")
    data: list[str] = Field(description="text/.jsonl/.parquet files, directories, save_to_disk")
    data_field: str = Field("text", description="text field of jsonl/parquet/datasets")
    block_size: int = Field(2048, ge=8, description="target tokens per block")
    seed: int = Field(0, description="data order and initialisation seed")
    aligner: str | None = Field(None, description="aligner gRPC host:port (unset = CLM only)")
    teachers: list[str] = Field(default_factory=list, description="teacher subset (all if empty)")
    preset: str = Field("", description='aligner options preset for this run ("" = its default)')
    fusion_options: dict[str, Any] = Field(
        default_factory=dict, description="FusionOptions overrides sent with every request (JSON)"
    )
    k: int = Field(0, ge=0, description="top-k per teacher (0 = the aligner's default)")
    prefetch_depth: int = Field(
        0,
        ge=0,
        description="fused blocks requested ahead per worker (0 = two steps' worth: "
        "2 x batch_size x grad_accum, at least 8; set by hand it must hold one step)",
    )
    aligner_timeout_s: float = Field(600.0, gt=0, description="longest wait for one fused block")
    aligner_outage_s: float = Field(
        900.0,
        ge=0,
        description="an aligner (or a teacher behind it) that is unavailable or shedding load is "
        "waited for, with backoff, for up to this many seconds before the run fails (training "
        "pauses meanwhile; it never goes on without fused targets)",
    )
    lam: float = Field(0.9, ge=0.0, le=1.0, description="weight of the CLM loss (λ)")
    lam_end: float | None = Field(
        None, ge=0.0, le=1.0, description="λ at the last step (linear schedule; unset = static)"
    )
    fusion_loss: FusionLoss = Field(FusionLoss.SOFT_CE, description="soft_ce or kl")
    temperature: float = Field(1.0, gt=0.0, description="temperature of the target's softmax")
    batch_size: int = Field(1, ge=1, description="blocks per worker per micro-batch")
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per optimizer step (gradient accumulation)"
    )
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm (0 = off)")
    warmup_ratio: float = Field(0.008, ge=0.0, le=1.0)
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the weights (bfloat16 = pure bf16, no fp32 master)"
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="bf16: autocast forward in bfloat16, fp32 master weights (for GPUs)"
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: whole model per worker; fsdp: parameters, gradients and optimizer "
        "state sharded across workers (torch FSDP2 fully_shard), sharded checkpoints",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations in backward (HF gradient "
        "checkpointing): less activation memory, one more forward per step",
    )
    loss_chunk: int = Field(
        1024,
        ge=0,
        description="positions per slice of the loss (bounds its [chunk, vocab] temporaries; "
        "0 = the whole micro-batch at once)",
    )
    chat: bool = Field(
        False,
        description="data is chat jsonl (messages, or prompt/response): rendered with the "
        "target's chat template, loss only on assistant tokens",
    )
    on_policy: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of steps whose completions the student samples (GKD's lambda; "
        "spread evenly over the steps; 0 = off-policy only)",
    )
    onpolicy_loss: OnPolicyLoss = Field(
        OnPolicyLoss.JSD,
        description="loss of on-policy steps: jsd (generalized JSD(jsd_beta) over the fused "
        "support) or sampled_rkl (sampled-token reverse KL, policy-gradient KD)",
    )
    jsd_beta: float = Field(
        1.0, ge=0.0, le=1.0, description="beta of the jsd loss: 0 forward KL, 1 reverse KL"
    )
    prompts: str | None = Field(
        None,
        description="on-policy prompts: jsonl with a 'prompt' or chat 'messages' field per line "
        "(unset = prefixes of the training blocks)",
    )
    prompt_tokens: int = Field(
        0,
        ge=0,
        description="on-policy prompt length in tokens: the prefix cut from each block, or the "
        "last tokens kept of a long prompt (0 = block_size // 2)",
    )
    max_new_tokens: int = Field(64, ge=1, description="most tokens an on-policy completion has")
    sampling_temperature: float = Field(
        1.0, gt=0.0, description="temperature of on-policy sampling"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus (top-p) of on-policy sampling")
    generation_batch: int = Field(
        0,
        ge=0,
        description="prompts per generate call of an on-policy step (0 = all of the step's "
        "prompts in one call; fewer bound the KV cache and let the aligner judge one call's "
        "samples while the next are sampled)",
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool = Field(False, description="one GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int = Field(0, ge=0, description="torch threads per worker (0 = auto)")
    storage_path: str = Field(
        str(Path("runs").absolute()), description="where Ray keeps results and checkpoints"
    )
    name: str = Field("fuseserve-train", description="run name (same name = resume)")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    checkpoint_every_s: float = Field(
        600.0,
        ge=0.0,
        description="also checkpoint when this many seconds have passed since the last one, so "
        "a failure loses minutes, not hours (0 = by steps only)",
    )
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1, description="worker failures to recover from")
    log_every: int = Field(
        10,
        ge=1,
        description="steps between ray.train.report calls (a cross-worker barrier in Ray Train "
        "V2, ~2 s each here); metrics_file gets every step",
    )
    metrics_file: str | None = Field(None, description="rank 0 appends step metrics (jsonl)")
    eval_data: list[str] = Field(
        default_factory=list,
        description="held-out text per domain, DOMAIN=PATH[,PATH] (bits per byte during training)",
    )
    eval_every: int = Field(
        0, ge=0, description="steps between held-out evaluations (0 = only before and after)"
    )
    eval_max_length: int = Field(512, ge=8, description="tokens per evaluation window")
    export_dir: str | None = Field(None, description="copy the final HF model here")
    fused_from: str | None = Field(
        None,
        description="train on the fused targets of a store written by `fuseserve export` "
        "(no teacher or aligner running; the store must match this run's tokenizer, fusion "
        "choices and blocks)",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        end = 1.0 if self.lam_end is None else self.lam_end
        if min(self.lam, end) < 1.0 and not self.aligner and not self.fused_from:
            raise ValueError(
                "aligner: needed when lam or lam_end < 1 (fusion loss), or fused_from (a store "
                "written by fuseserve export); set lam=1 for CLM only"
            )
        if self.fused_from and self.aligner:
            raise ValueError(
                "fused_from: a run reads fused targets from a store or an aligner, "
                "not both; unset aligner"
            )
        if self.fused and self.prefetch_depth and self.prefetch_depth < self.blocks_per_step:
            raise ValueError(
                f"prefetch_depth: {self.prefetch_depth} cannot hold one step's "
                f"{self.blocks_per_step} blocks (batch_size x grad_accum); use 0 (auto) or more"
            )
        if self.on_policy > 0 and not self.aligner:
            raise ValueError("on_policy: needs an aligner (the teachers judge the samples)")
        if self.on_policy > 0 and self.prompt_length() >= self.block_size and not self.prompts:
            raise ValueError(
                f"prompt_tokens: {self.prompt_length()} leaves no block text after the prompt "
                f"(block_size {self.block_size})"
            )
        if self.prompts and not Path(self.prompts).is_file():
            raise ValueError(f"prompts: no such file {self.prompts!r}")
        for spec in self.eval_data:
            domain, sep, paths = spec.partition("=")
            if not sep or not domain or not paths:
                raise ValueError(f"eval_data: expected DOMAIN=PATH[,PATH], got {spec!r}")
        return self

    def eval_domains(self) -> dict[str, list[str]]:
        """``eval_data`` as {domain: [paths]}."""
        out: dict[str, list[str]] = {}
        for spec in self.eval_data:
            out[spec.partition("=")[0]] = spec.partition("=")[2].split(",")
        return out

    @property
    def blocks_per_step(self) -> int:
        """Blocks one worker consumes per optimizer step."""
        return self.batch_size * self.grad_accum

    def fused_prefetch_depth(self) -> int:
        """Fused blocks in flight per worker: as set, or two steps' worth (at least 8)."""
        return self.prefetch_depth or max(8, 2 * self.blocks_per_step)

    def prompt_length(self) -> int:
        """Tokens of an on-policy prompt: ``prompt_tokens``, or half a block."""
        return self.prompt_tokens or self.block_size // 2

    def onpolicy_before(self, step: int) -> int:
        """On-policy steps among the 0-based steps before ``step``: floor(step × on_policy), so
        they are spread evenly and their share after n steps is as close to F as it can be."""
        return math.floor(step * self.on_policy + 1e-9)

    def is_onpolicy(self, step: int) -> bool:
        """Whether the 0-based ``step`` samples its completions."""
        return self.onpolicy_before(step + 1) > self.onpolicy_before(step)

    def warmup_steps(self) -> int:
        """Warm-up steps: ``warmup_ratio`` of ``max_steps``, at least 1 when the ratio is > 0."""
        if self.warmup_ratio <= 0:
            return 0
        return max(1, round(self.warmup_ratio * self.max_steps))

    def lam_at(self, step: int) -> float:
        """λ for a 0-based step (linear from ``lam`` to ``lam_end`` over ``max_steps``)."""
        if self.lam_end is None or self.max_steps <= 1:
            return self.lam
        frac = min(step / (self.max_steps - 1), 1.0)
        return self.lam + (self.lam_end - self.lam) * frac

    @property
    def fused(self) -> bool:
        """The run asks the aligner for something (fused blocks or judged samples)."""
        return self.fuses_offpolicy or (self.aligner is not None and self.on_policy > 0)

    @property
    def fuses_offpolicy(self) -> bool:
        """Off-policy steps train on fused blocks (some λ < 1 and an aligner)."""
        end = 1.0 if self.lam_end is None else self.lam_end
        source = self.aligner is not None or self.fused_from is not None
        return source and (self.lam < 1.0 or end < 1.0)

    @field_validator("fused_from")
    @classmethod
    def _absolute_store(cls, value: str | None) -> str | None:
        """A store path as an absolute path (Ray workers run in other directories)."""
        return None if value is None else str(Path(value).expanduser().absolute())


def load_config(config: str | None = None, **overrides: Any) -> TrainConfig:
    """Settings from an optional YAML file, the environment and explicit overrides."""
    return load_settings_file(TrainConfig, config, **overrides)
