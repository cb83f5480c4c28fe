"""The vLLM backend against a local HTTP server that answers in vLLM's documented format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fuseserve.teacher.errors import EngineUnavailable, InvalidRequest
from fuseserve.teacher.vllm_backend import VLLMBackend
from tests.teacher.conftest import json_http_server


@pytest.fixture(scope="module")
def fake_vllm(tiny_backend):
    """Answers /v1/completions with prompt_logprobs computed by the tiny model itself."""
    seen = []

    def answer(path, body):
        seen.append(body)
        ids = torch.tensor(body["prompt"])[None]
        k = body["prompt_logprobs"]
        with torch.inference_mode():
            logp = torch.log_softmax(tiny_backend.model(input_ids=ids).logits[0].float(), -1)
        entries = [None]
        for j in range(1, ids.shape[1]):
            row = logp[j - 1]
            values, top = row.topk(k)
            entry = {
                str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": "x"}
                for r, (t, v) in enumerate(zip(top, values))
            }
            actual = int(ids[0, j])
            rank = int((row > row[actual]).sum()) + 1
            entry.setdefault(
                str(actual), {"logprob": float(row[actual]), "rank": rank, "decoded_token": "x"}
            )
            entries.append(entry)
        return {"choices": [{"text": "x", "prompt_logprobs": entries}]}

    with json_http_server(answer) as url:
        yield url, seen


def test_vllm_scores_equal_the_local_forward(fake_vllm, tiny_backend):
    url, seen = fake_vllm
    backend = VLLMBackend(url, "tiny", tiny_backend.tokenizer, max_k=8)
    item = backend.tokenize("Fusion of several teachers, one target.", None)
    remote = backend.score([item], 5)[0]
    local = tiny_backend.score([item], 5)[0]
    assert seen[-1]["max_tokens"] == 1 and seen[-1]["temperature"] == 1.0
    assert seen[-1]["prompt_logprobs"] == 5
    np.testing.assert_array_equal(remote.topk_ids[:-1], local.topk_ids[:-1])
    np.testing.assert_allclose(remote.topk_logprobs[:-1], local.topk_logprobs[:-1], atol=1e-5)
    np.testing.assert_allclose(remote.gold_logprobs, local.gold_logprobs, atol=1e-5)
    assert np.all(np.isneginf(remote.topk_logprobs[-1]))


def test_vllm_guards(fake_vllm, tiny_backend):
    url, _ = fake_vllm
    backend = VLLMBackend(url, "tiny", tiny_backend.tokenizer, max_k=4)
    item = backend.tokenize("short text here", None)
    with pytest.raises(InvalidRequest, match="max_logprobs"):
        backend.score([item], 5)
    dead = VLLMBackend("http://127.0.0.1:9", "tiny", tiny_backend.tokenizer, timeout_s=2)
    with pytest.raises(EngineUnavailable, match="vLLM"):
        dead.score([item], 2)


def test_vllm_backend_served_over_grpc(fake_vllm, tiny_backend, loop_thread):
    import grpc

    from fuseserve.wire.messages import TeacherScores
    from fuseserve.wire.v1 import teacher_pb2, teacher_pb2_grpc
    from tests.teacher.conftest import start_teacher

    url, _ = fake_vllm
    backend = VLLMBackend(url, "tiny", tiny_backend.tokenizer, max_k=8)
    running = start_teacher(loop_thread, backend)
    text = "Served through gRPC, scored by a vLLM-format server."
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            info = stub.Info(teacher_pb2.InfoRequest(), timeout=30)
            assert info.backend == "vllm" and info.max_k == 8
            reply = next(iter(stub.Score(teacher_pb2.ScoreRequest(texts=[text], k=5), timeout=60)))
            served = TeacherScores.from_bytes(reply.scores)
            local = tiny_backend.score([tiny_backend.tokenize(text, None)], 5)[0]
            np.testing.assert_array_equal(served.topk_ids[:-1], local.topk_ids[:-1])
            np.testing.assert_allclose(served.gold_logprobs, local.gold_logprobs, atol=1e-5)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Score(teacher_pb2.ScoreRequest(texts=[text], k=9), timeout=60))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        loop_thread.run(running.stop(1.0))
