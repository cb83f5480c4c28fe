"""On-policy steps: the student samples completions, the fused teachers judge them, it learns.

Covers what one on-policy step does on one worker, between the recipe's step bookkeeping and the
losses: take this worker's prompts for the step (``prompts``), sample a completion for each, one
``generate`` call per ``generation_batch`` prompts (``generation``; by default all of the step's
at once: on small models a decoding step costs about the same for 2 rows as for 16), hand every
sequence (prompt + completion ids) to the fused-target stream as soon as its call returns
(``feed``: with several calls the aligner scores one call's samples while the next are sampled),
collect the fused rows in order, and build
micro-batches whose loss covers only the completion tokens: a sample is a ``Block`` whose
``loss_mask`` marks its completion, so labels are −100 on the prompt and a fused row i is kept
only where token i + 1 is a completion token (the chat mechanics of ``step.batch_tensors``). The
loss (``loss_fn``) is ``jsd`` (JSD(β) over each kept row's fused support) or ``sampled_rkl``
(the sampled-token reverse KL); no CLM term (λ does not apply to on-policy steps). Alongside it
every micro-batch reports the teacher-judged NLL (mean −log q_fused(x_t) of the sampled tokens,
nats) and the divergence (JSD value, or the reverse-KL estimate).

Which steps are on-policy: ``TrainConfig.is_onpolicy`` (an even spread, share ``on_policy``); the
k-th of them takes prompts at position k of the prompt order, so a resumed run continues with the
same prompts, and each ``generate`` call samples from a seed fixed by (seed, step, rank, call).

Shapes: see ``step`` (micro-batches [B, L], fused [B, L, W]).

Leaves out: the optimizer step, metrics file and checkpoints (``recipe``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fuseserve.trainer.config import TrainConfig
from fuseserve.trainer.data import Block
from fuseserve.trainer.generation import (
    eos_ids_of,
    generation_model,
    sample_completions,
    sampling_seed,
)
from fuseserve.trainer.jsd import jsd_loss
from fuseserve.trainer.loss_kind import OnPolicyLoss
from fuseserve.trainer.prompts import Prompt, block_prompts, prompt_indices, read_prompts
from fuseserve.trainer.sampled_kl import sampled_kl_loss, sampled_token_log_q
from fuseserve.trainer.step import LossFn, MicroBatch, batch_tensors


@dataclass
class Rollout:
    """One step's samples as micro-batches, with what the metrics need."""

    micro_batches: list[MicroBatch]
    samples: list[Block]
    generation_s: float
    prompt_indices: list[int]

    @property
    def completion_lengths(self) -> list[int]:
        return [int(s.loss_mask.sum()) for s in self.samples if s.loss_mask is not None]


def make_sample(key: int, prompt: np.ndarray, completion: np.ndarray) -> Block:
    """A sampled sequence as a block: ids = prompt + completion, ``loss_mask`` on the completion;
    ``key`` is its unique number in this worker's run (the stream's request id)."""
    ids = np.concatenate([prompt, completion]).astype(np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prompt) :] = True
    return Block(key, "", ids, mask)


class OnPolicy:
    """This worker's on-policy steps; see the module docstring."""

    def __init__(self, cfg: TrainConfig, tokenizer, blocks: list[Block], rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.tokenizer = tokenizer
        if cfg.prompts:
            self.prompts = read_prompts(cfg.prompts, tokenizer, cfg.prompt_length())
        else:
            self.prompts = block_prompts(blocks, cfg.prompt_length())
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def prompts_for(self, step: int) -> list[Prompt]:
        """This worker's prompts of the 0-based on-policy ``step``."""
        cfg = self.cfg
        k = cfg.onpolicy_before(step)
        picked = prompt_indices(
            len(self.prompts), cfg.seed, self.rank, self.world, cfg.blocks_per_step, k
        )
        return [self.prompts[i] for i in picked]

    def rollout(self, model, step: int, stream, device: torch.device) -> Rollout:
        """Sample the step's completions ``generation_batch`` prompts per ``generate`` call,
        feeding each call's samples to ``stream`` at once; then the micro-batches of
        ``batch_size`` samples with their fused rows."""
        cfg = self.cfg
        prompts = self.prompts_for(step)
        eos = eos_ids_of(generation_model(model), self.tokenizer)
        synced = cfg.parallel == "fsdp" and self.world > 1
        per_call = cfg.generation_batch or len(prompts)
        samples: list[Block] = []
        gen_s = 0.0
        for g in range(0, len(prompts), per_call):
            part = prompts[g : g + per_call]
            seed = sampling_seed(cfg.seed, step, self.rank, g // per_call)
            t0 = time.perf_counter()
            completions = sample_completions(
                model, [p.ids for p in part], cfg, device, self.pad_id, eos, seed, synced
            )
            gen_s += time.perf_counter() - t0
            base = step * cfg.blocks_per_step + g
            made = [
                make_sample(base + j, p.ids, c) for j, (p, c) in enumerate(zip(part, completions))
            ]
            stream.feed(made)
            samples += made
        fused = [stream.get(s, fed=True) for s in samples]
        micro = [
            batch_tensors(
                samples[m : m + cfg.batch_size], fused[m : m + cfg.batch_size], self.pad_id
            )
            for m in range(0, len(samples), cfg.batch_size)
        ]
        return Rollout(micro, samples, gen_s, [p.index for p in prompts])

    def loss_fn(self) -> LossFn:
        """The on-policy loss of the run's settings, as ``step.accumulate_gradients`` takes it."""
        cfg = self.cfg
        chunk = cfg.loss_chunk or None

        def loss(logits, batch: MicroBatch, denominators: tuple[int, int]):
            _, _, labels, f_ids, f_p, f_tail = batch
            assert f_ids is not None and f_p is not None
            n_label, n_target = denominators
            if cfg.onpolicy_loss is OnPolicyLoss.SAMPLED_RKL:
                out = sampled_kl_loss(
                    logits, labels, f_ids, f_p, f_tail, cfg.temperature, n_label, chunk
                )
                return out.loss, out.teacher_nll, out.estimate
            value = jsd_loss(
                logits, f_ids, f_p, f_tail, cfg.jsd_beta, cfg.temperature, n_target, chunk
            )
            return value, teacher_nll(labels, f_ids, f_p, f_tail, n_label), value.detach()

        return loss


def teacher_nll(labels, f_ids, f_p, f_tail, denominator: float) -> torch.Tensor:
    """Σ −log q_fused(x_t) over the completion tokens in ``labels``, / ``denominator``."""
    next_ids = torch.full_like(labels, -100)
    next_ids[:, :-1] = labels[:, 1:]
    mask = next_ids != -100
    log_q, _ = sampled_token_log_q(next_ids.clamp(min=0), f_ids, f_p, f_tail)
    return torch.where(mask, -log_q, 0.0).sum() / max(float(denominator), 1.0)
