"""FSDP2 on CPU (gloo, 2 Ray workers): same trajectory as DDP; a SIGKILLed fused run resumes."""

from __future__ import annotations

import contextlib
import json
import signal

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from fuseserve.trainer.checkpoint import STATE_FILE, find_latest_checkpoint
from tests.trainer.conftest import assert_same_weights, interrupted_run, resume, small_run

pytestmark = pytest.mark.slow


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (Ray's raylet and train workers) at once, as
    a lost node would: no worker may go on training after its driver died."""
    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def small_fsdp_run(tiny_dirs, corpus, tmp_path, **settings) -> dict:
    """2 workers, blocks of 32 tokens, 1 block x 2 micro-batches per worker and step."""
    shape = dict(block_size=32, batch_size=1, grad_accum=2, num_workers=2)
    return small_run(tiny_dirs, corpus, tmp_path, **shape, **settings)


def held_out_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if '"eval_bpb"' in line]


def test_fsdp_follows_the_ddp_loss_trajectory(ray_session, tiny_dirs, corpus, prose, tmp_path):
    """3 steps, 2 micro-batches each, 2 workers: FSDP2 losses and final weights equal DDP's."""
    held_out = tmp_path / "held-out.txt"
    held_out.write_text(prose[-1500:])
    runs = {}
    for mode in ("ddp", "fsdp"):
        settings = small_fsdp_run(tiny_dirs, corpus, tmp_path, max_steps=3, checkpoint_every=3)
        settings.update(lam=1.0, parallel=mode, eval_data=[f"prose={held_out}"])
        runs[mode] = resume(settings, tmp_path, mode)[::-1]
    ddp, fsdp = runs["ddp"][0], runs["fsdp"][0]
    # held-out BPB before and after: every rank evaluates the sharded model, same values
    bpb = {m: held_out_rows(tmp_path / f"{m}.resumed.jsonl") for m in ("ddp", "fsdp")}
    assert [r["step"] for r in bpb["fsdp"]] == [0, 3]
    for a, b in zip(bpb["ddp"], bpb["fsdp"]):
        assert b["eval_bpb"]["prose"] == pytest.approx(a["eval_bpb"]["prose"], abs=1e-4)
    assert [m["step"] for m in fsdp] == [1, 2, 3]
    assert fsdp[-1]["blocks_seen"] == 12  # 1 block x 2 micro-batches x 2 workers x 3 steps
    assert fsdp[0]["global_batch_tokens"] == ddp[0]["global_batch_tokens"] > 0
    for a, b in zip(ddp, fsdp):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert ddp[0]["loss"] != pytest.approx(ddp[-1]["loss"], abs=1e-3)  # it did train
    # the FSDP run ends with a plain Hugging Face model equal to DDP's
    assert_same_weights(runs["fsdp"][1].model_dir, runs["ddp"][1].model_dir, atol=1e-4)
    checkpoint = find_latest_checkpoint(str(tmp_path / "runs"), "fsdp")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state["parallel"] == "fsdp" and state["world"] == 2
    assert len(list((checkpoint / "dcp").glob("*.distcp"))) == 2  # one shard file per rank


def test_a_sigkilled_fused_fsdp_run_resumes_exactly(
    ray_session, aligner, tiny_dirs, corpus, tmp_path
):
    common = small_fsdp_run(tiny_dirs, corpus, tmp_path, max_steps=10, checkpoint_every=2)
    common.update(lam=0.5, aligner=aligner.grpc_address, parallel="fsdp")
    saved = interrupted_run(common, tmp_path / "killed.jsonl", lambda proc: kill_tree(proc.pid))
    assert saved["step"] < 10, "the run finished before it could be killed"
    assert saved["step"] % 2 == 0 and saved["blocks_seen"] == saved["step"] * 4

    resumed, metrics = resume(common, tmp_path)
    assert metrics[0]["step"] == saved["step"] + 1
    assert metrics[0]["blocks_seen"] == saved["blocks_seen"] + 4
    assert metrics[-1]["step"] == 10 and all(m["fusion_loss"] > 0 for m in metrics)

    straight, straight_metrics = resume(common, tmp_path, "straight", checkpoint_every=10)
    by_step = {m["step"]: m["loss"] for m in straight_metrics}
    for m in metrics:
        assert m["loss"] == pytest.approx(by_step[m["step"]], abs=1e-5)
    assert_same_weights(resumed.model_dir, straight.model_dir, atol=1e-5)


def fetch_fused(aligner, tokenizer, blocks, teachers=()):
    """The aligner's fused targets for ``blocks`` through the trainer's prefetch stream."""
    from fuseserve.aligner.tokenview import TokenizerView
    from fuseserve.trainer.prefetch import FusedTargetStream

    stream = FusedTargetStream(
        aligner.grpc_address,
        blocks,
        iter(range(len(blocks))),
        depth=len(blocks),
        target_fingerprint=TokenizerView.from_hf(tokenizer).fingerprint,
        teachers=teachers,
        timeout_s=120,
    ).start()
    try:
        return [stream.get(b) for b in blocks]
    finally:
        stream.close()


def test_a_teacher_subset_is_the_only_teacher_the_aligner_calls(aligner, mistral_tok, prose):
    """``--teachers spm``: the aligner calls spm for every block and never bpe."""
    from fuseserve.trainer.data import pack_blocks

    def calls(name):
        labels = {"teacher": name, "outcome": "ok"}
        return aligner.metric("fuseserve_aligner_teacher_calls_total", labels)

    # text no other test sends, so nothing comes from the cache
    text = "A teacher subset test, fresh text.\n" + prose[-3000:][::-1]
    blocks = pack_blocks(mistral_tok, [text], block_size=32)[:3]
    before = {name: calls(name) for name in ("spm", "bpe")}
    fused = fetch_fused(aligner, mistral_tok, blocks, teachers=["spm"])
    assert all(f.teachers == ("spm",) for f in fused)
    assert calls("spm") - before["spm"] == len(blocks)
    assert calls("bpe") == before["bpe"]


def test_chat_blocks_are_fused_on_the_rendered_text(aligner, mistral_tok):
    """The aligner scores a rendered conversation (template markers and EOS included) and answers
    with the trainer's own ids for it; the batch keeps fused rows only before assistant tokens."""
    from fuseserve.trainer.data import chat_blocks
    from fuseserve.trainer.step import batch_tensors

    conversations = [
        [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        for a, b in ((2, 3), (10, 7))
    ]
    blocks = chat_blocks(mistral_tok, conversations, block_size=64)
    assert len(blocks) == 2 and all("</s>" in b.text for b in blocks)
    fused = fetch_fused(aligner, mistral_tok, blocks)  # TargetMismatch on other ids
    _, _, labels, f_ids, _, _ = batch_tensors(blocks, fused, 0)
    for r, block in enumerate(blocks):
        n = len(block.ids)
        rows = (f_ids[r, : n - 1] >= 0).any(-1)
        assert rows.any() and not rows[~torch.from_numpy(block.loss_mask[1:])].any()
        assert (labels[r, :n] != -100).tolist() == block.loss_mask.tolist()


def test_a_chat_run_trains_on_fused_assistant_tokens(ray_session, aligner, tiny_dirs, tmp_path):
    """--chat end to end: conversations rendered, fused, trained on their assistant tokens."""
    data = tmp_path / "chat.jsonl"
    lines = [
        {"prompt": f"What is {a} times {b}?", "response": f"{a} times {b} is {a * b}."}
        for a in range(2, 6)
        for b in (3, 7)
    ]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = small_run(
        tiny_dirs, str(data), tmp_path, block_size=64, batch_size=2, grad_accum=2, max_steps=2
    )
    settings.update(num_workers=1, chat=True, lam=0.5, aligner=aligner.grpc_address)
    result, metrics = resume(settings, tmp_path, "chat")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["blocks_seen"] == 8
    assert all(m["fusion_loss"] > 0 and m["clm_loss"] > 0 for m in metrics)
    assert metrics[0]["global_batch_tokens"] == sum(
        len(b.ids) for b in blocks_of_first_step(settings)
    )
    assert result.model_dir is not None


def blocks_of_first_step(settings):
    """The 4 blocks the first step of a 1-worker run takes (the trainer's own schedule)."""
    from fuseserve.loading import load_tokenizer
    from fuseserve.trainer.config import TrainConfig
    from fuseserve.trainer.data import build_blocks, worker_schedule

    cfg = TrainConfig(**settings)
    blocks = build_blocks(cfg, load_tokenizer(cfg.model))
    _, _, idxs = next(worker_schedule(len(blocks), cfg.seed, 0, 1, cfg.blocks_per_step))
    return [blocks[i] for i in idxs]


def test_fsdp_with_bf16_autocast_and_activation_checkpointing(
    ray_session, tiny_dirs, corpus, tmp_path
):
    """The GPU settings wired together on CPU: losses close to fp32's, fp32 weights exported."""
    settings = small_fsdp_run(tiny_dirs, corpus, tmp_path, max_steps=2, checkpoint_every=2)
    settings.update(lam=1.0, parallel="fsdp")
    low = {"mixed_precision": "bf16", "activation_checkpointing": True}
    result, metrics = resume({**settings, **low}, tmp_path, "bf16")
    _, reference = resume(settings, tmp_path, "fp32")
    for a, b in zip(metrics, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2) and a["loss"] != b["loss"]
    exported = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
