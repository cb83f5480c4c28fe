"""TRL itself trains against the aligner as its teacher: ``trl.experimental.server_distillation.
ServerDistillationTrainer`` (TRL 1.16; on-policy: a tiny student Llama on the shipped Mistral v1
tokenizer generates from prompt-only data with transformers, ``use_vllm=False``) with
``teacher_model_server_url`` = the real aligner's REST port, whose teachers are real processes.

β = 1 (reverse KL, top-1 support) and β = 0 (forward KL over the top-k), 20 steps each: the loss
is finite and falls, and what TRL's client received (its ``get_sequence_logprobs`` result, wrapped
to be recorded) equals the aligner's fused rows of the same sequences asked through ``/v1/fuse``
with ``token_ids``.

Stand-in: TRL's ``VLLMClient`` refuses to start unless the ``vllm`` package imports, and vLLM does
not install on these CPU machines, so the test replaces that one availability check
(``trl.generation.vllm_client.is_vllm_available``) with one that says yes. Everything else is
TRL's real client (``requests`` over HTTP to the aligner) and trainer code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fuseserve.aligner.service.openai_logprobs import NEG_INF_LOGPROB, prompt_logprobs
from fuseserve.client import FuseParams, RestClient

pytestmark = pytest.mark.slow

trl = pytest.importorskip("trl", minversion="1.16")

PEAK = 20.0  # the student's final norm scaled up: sharp next-token distributions

PROMPTS = [
    "The aligner fuses",
    "def add(a, b):",
    "Knowledge fusion of",
    "for item in",
    "A class definition",
    "The teacher returns",
    "import numpy as",
    "while True:",
]


@pytest.fixture
def recorded(monkeypatch):
    """Stand in for the vLLM import check only, and record every answer TRL's client gets."""
    from trl.generation import vllm_client

    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    calls = []
    real = vllm_client.VLLMClient.get_sequence_logprobs

    def recording(self, sequences, prompt_lengths, **kwargs):
        result = real(self, sequences, prompt_lengths, **kwargs)
        calls.append((sequences, prompt_lengths, kwargs, result))
        return result

    monkeypatch.setattr(vllm_client.VLLMClient, "get_sequence_logprobs", recording)
    return calls


def train(url: str, tokenizer, beta: float, top_k: int, out_dir) -> list[float]:
    """20 steps of TRL's server distillation; the logged training losses."""
    from datasets import Dataset
    from trl.experimental.server_distillation import (
        ServerDistillationConfig,
        ServerDistillationTrainer,
    )

    from fuseserve.teacher.tiny import build_tiny_llama

    student = build_tiny_llama(tokenizer, seed=11).train()
    with torch.no_grad():  # a peaked student, far from the teachers: a loss worth lowering
        student.model.norm.weight.mul_(PEAK)
    config = ServerDistillationConfig(
        output_dir=str(out_dir),
        teacher_model_server_url=url,
        beta=beta,
        loss_top_k=top_k,
        max_steps=20,
        per_device_train_batch_size=4,
        max_completion_length=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        gradient_checkpointing=False,
        seed=0,
        shuffle_dataset=False,
    )
    trainer = ServerDistillationTrainer(
        model=student,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def check_received(url: str, calls, top_k: int, view) -> int:
    """Every answer TRL's client returned equals the fused rows of ``/v1/fuse`` (token_ids).
    Returns how many completion positions were compared."""
    compared = 0
    with RestClient(url, timeout_s=120) as rest:
        for sequences, prompt_lengths, kwargs, result in calls:
            params = FuseParams(preset="spans", float_dtype="f32", top=None)
            blocks = rest.fuse(token_ids=sequences, params=params).blocks
            temperature = kwargs.get("temperature", 1.0)
            for i, (seq, start) in enumerate(zip(sequences, prompt_lengths)):
                want = prompt_logprobs(blocks[i].block, top_k, temperature, view)
                rows = slice(start - 1, len(seq) - 1)  # position p is row p - 1
                got_actual = np.asarray(result["actual_logprobs"][i], dtype=np.float64)[:, 0]
                # the wire writes a log-probability of -inf as -9999.0, as vLLM does
                actual = np.maximum(want.actual_logprobs[rows], NEG_INF_LOGPROB)
                np.testing.assert_allclose(got_actual, actual, rtol=1e-12)
                got_ids = np.asarray(result["logprob_token_ids"][i])
                np.testing.assert_array_equal(got_ids, np.maximum(want.top_ids[rows], 0))  # pad 0
                got_top = np.asarray(result["logprobs"][i], dtype=np.float64)
                np.testing.assert_allclose(got_top, want.top_logprobs[rows], rtol=1e-12)
                compared += len(seq) - start
    return compared


def falling(losses: list[float]) -> bool:
    head, tail = np.mean(losses[:5]), np.mean(losses[-5:])
    return bool(tail < head)


@pytest.mark.parametrize(("beta", "top_k"), [(1.0, 1), (0.0, 5)])
def test_trl_server_distillation_against_the_aligner(
    aligner, recorded, mistral_tok, mistral, tmp_path, beta, top_k
):
    url = str(aligner.rest.base_url)
    losses = train(url, mistral_tok, beta, top_k, tmp_path)
    assert len(losses) == 20
    assert all(math.isfinite(x) for x in losses), losses
    assert falling(losses), losses
    assert len(recorded) >= 20
    assert check_received(url, recorded, top_k, mistral) > 0
