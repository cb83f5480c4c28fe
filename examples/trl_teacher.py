"""fuseserve as TRL's teacher: on-policy distillation of a student from the fused distribution of
every teacher behind a running aligner (docs/integrations.md).

TRL's ``ServerDistillationTrainer`` lets the student generate completions for prompt-only data
and asks a "vLLM server" for the teacher's log-probabilities of prompt + completion; here that
server is the aligner's REST port (``/v1/completions`` with ``prompt_logprobs``). The student must
use the aligner's target tokenizer (Mistral v1 for ``shipped:mistral-v1``).

Usage (an aligner on localhost:8080, see docs/integrations.md for starting one):
    python examples/trl_teacher.py --aligner http://127.0.0.1:8080 --steps 20 --beta 1
    python examples/trl_teacher.py --aligner http://127.0.0.1:8080 --beta 0 --top-k 5
``--student DIR``: a causal LM on the target tokenizer (default: a tiny random Llama on the
shipped Mistral v1 tokenizer, enough to see the loop run on a CPU).

TRL's client refuses to start unless the ``vllm`` package imports. Where vLLM is not installed
(a CPU machine), this script replaces that one check and says so; nothing else is changed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math


def allow_without_vllm() -> None:
    """TRL checks that vLLM is installed before talking to a server; the aligner needs none."""
    if importlib.util.find_spec("vllm") is not None:
        return
    from trl.generation import vllm_client

    print("note: vllm is not installed; skipping TRL's vllm import check (the client is TRL's)")
    vllm_client.is_vllm_available = lambda *a, **k: True


def student_and_tokenizer(path: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path:
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    from fuseserve import shipped
    from fuseserve.teacher.tiny import build_tiny_llama

    tokenizer = shipped.mistral_v1_tokenizer()
    return build_tiny_llama(tokenizer, seed=0).train(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligner", default="http://127.0.0.1:8080", help="its REST base URL")
    parser.add_argument("--student", default=None, help="a model dir on the target tokenizer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--beta", type=float, default=1.0, help="1: reverse KL, 0: forward KL")
    parser.add_argument("--top-k", type=int, default=1, help="teacher entries (beta > 0: 1)")
    parser.add_argument("--out", default="trl-teacher-run")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from trl.experimental.server_distillation import (
        ServerDistillationConfig,
        ServerDistillationTrainer,
    )

    allow_without_vllm()
    student, tokenizer = student_and_tokenizer(args.student)
    prompts = ["def fibonacci(n):", "The aligner fuses", "import numpy as", "class Stack:"]
    config = ServerDistillationConfig(
        output_dir=args.out,
        teacher_model_server_url=args.aligner,
        beta=args.beta,
        loss_top_k=args.top_k,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        max_completion_length=16,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),  # TRL's default bf16 needs a GPU
    )
    trainer = ServerDistillationTrainer(
        model=student,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print("losses:", " ".join(f"{x:.4g}" for x in losses))
    print("all finite:", all(math.isfinite(x) for x in losses))


if __name__ == "__main__":
    main()
