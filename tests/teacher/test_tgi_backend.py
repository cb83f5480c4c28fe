"""The TGI backend against a local HTTP server answering in TGI's documented generate format."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fuseserve.teacher.errors import EngineUnavailable, InvalidRequest
from fuseserve.teacher.settings import TeacherSettings
from fuseserve.teacher.tgi_backend import TGIBackend
from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.v1 import teacher_pb2, teacher_pb2_grpc
from tests.teacher.conftest import json_http_server, start_teacher

TEXT = "Fusion of several teachers, one target: 2024."


@pytest.fixture(scope="module")
def fake_tgi(tiny_backend):
    """Answers TGI's generate route; tokenises on the server and adds BOS, as TGI does."""
    seen = []
    tok = tiny_backend.tokenizer

    def answer(path, body):
        seen.append((path, body))
        ids = [tok.bos_token_id, *tok(body["inputs"], add_special_tokens=False)["input_ids"]]
        with torch.inference_mode():
            logits = tiny_backend.model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        prefill = [{"id": ids[0], "text": "<s>", "logprob": None}]
        prefill += [
            {"id": t, "text": "x", "logprob": float(logp[j - 1, t])}
            for j, t in enumerate(ids)
            if j > 0
        ]
        nxt = int(logp[-1].argmax())
        generated = {"id": nxt, "text": "x", "logprob": float(logp[-1, nxt]), "special": 0}
        details = {
            "finish_reason": "length",
            "generated_tokens": 1,
            "seed": None,
            "prefill": prefill,
            "tokens": [generated],
        }
        return [{"generated_text": "x", "details": details}]

    with json_http_server(answer) as url:
        yield url, seen


def test_tgi_gold_equals_the_local_forward(fake_tgi, tiny_backend):
    url, seen = fake_tgi
    backend = TGIBackend(url, "tiny", tiny_backend.tokenizer)
    item = backend.tokenize(TEXT, False)
    remote = backend.score([item], 1)[0]
    params = seen[-1][1]["parameters"]
    assert params["details"] and params["decoder_input_details"]
    assert params["max_new_tokens"] == 1
    assert seen[-1][1]["inputs"] == TEXT
    # TGI added BOS: it is kept, with an empty offset, and the rest are the local tokens
    local = tiny_backend.score([tiny_backend.tokenize(TEXT, True)], 1)[0]
    np.testing.assert_array_equal(remote.token_ids, local.token_ids)
    np.testing.assert_array_equal(remote.offsets, local.offsets)
    np.testing.assert_allclose(remote.gold_logprobs, local.gold_logprobs, atol=1e-5)
    # k = 1: the single entry is the actual next token and its log-prob
    np.testing.assert_array_equal(remote.topk_ids[:-1, 0], remote.token_ids[1:])
    np.testing.assert_allclose(remote.topk_logprobs[:-1, 0], remote.gold_logprobs[:-1])
    assert np.isneginf(remote.topk_logprobs[-1, 0])


def test_tgi_concurrent_batch_and_truncation(fake_tgi, tiny_backend):
    url, _ = fake_tgi
    backend = TGIBackend(url, "tiny", tiny_backend.tokenizer, max_sequence_length=6)
    texts = [TEXT, "A second, different text for the batch.", "third one"]
    items = [backend.tokenize(t, False, truncate=True) for t in texts]
    assert items[0].truncated and items[0].text == TEXT[: items[0].offsets[-1, 1]]
    out = backend.score(items, 1)
    for item, scores in zip(items, out):
        np.testing.assert_array_equal(scores.token_ids[1:], item.ids)
        assert scores.truncated == item.truncated


def test_tgi_refuses_k_above_one():
    with pytest.raises(ValidationError, match="k = 1 only"):
        TeacherSettings(backend="tgi", remote_url="http://x", max_k=5)
    assert TeacherSettings(backend="tgi", remote_url="http://x").max_k == 1
    with pytest.raises(ValidationError, match="remote_url"):
        TeacherSettings(backend="tgi")
    args = ["teacher", "--backend", "tgi", "--remote-url", "http://127.0.0.1:9", "--max-k", "4"]
    cli = subprocess.run(
        [sys.executable, "-m", "fuseserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2 and "k = 1 only" in cli.stderr


def test_tgi_dead_server_and_bad_k(tiny_backend):
    backend = TGIBackend("http://127.0.0.1:9", "tiny", tiny_backend.tokenizer, timeout_s=2)
    item = backend.tokenize(TEXT, False)
    with pytest.raises(InvalidRequest, match="k = 1 only"):
        backend.score([item], 2)
    with pytest.raises(EngineUnavailable, match="TGI at"):
        backend.score([item], 1)


def test_tgi_served_over_grpc(fake_tgi, tiny_backend, loop_thread):
    url, _ = fake_tgi
    backend = TGIBackend(url, "tiny", tiny_backend.tokenizer)
    running = start_teacher(loop_thread, backend)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = teacher_pb2_grpc.TeacherStub(channel)
            info = stub.Info(teacher_pb2.InfoRequest(), timeout=30)
            assert info.backend == "tgi" and info.max_k == 1
            replies = list(stub.Score(teacher_pb2.ScoreRequest(texts=[TEXT], k=1), timeout=60))
            scores = TeacherScores.from_bytes(replies[0].scores)
            assert scores.topk_ids.shape[1] == 1
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Score(teacher_pb2.ScoreRequest(texts=[TEXT], k=2), timeout=60))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("k")
    finally:
        loop_thread.run(running.stop(1.0))
