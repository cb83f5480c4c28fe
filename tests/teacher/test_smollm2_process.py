"""End to end: `fuseserve teacher` as a real process serving the shipped SmolLM2-135M GGUF."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseserve.teacher.hf_backend import HFBackend
from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.v1 import teacher_pb2, teacher_pb2_grpc

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smollm2_teacher_process_scores_and_drains_on_sigterm():
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "FUSESERVE_TEACHER_MAX_K": "16"}  # settings from the environment too
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fuseserve.cli",
            "teacher",
            "--model",
            "shipped:smollm2",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--max-sequence-length",
            "512",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        # Wait for SERVING on the health Watch stream (one deadline for start-up and loading).
        grpc.channel_ready_future(channel).result(timeout=120)
        status = None
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=240)
        for update in watch:
            status = update.status
            if status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                break
        assert status == health_pb2.HealthCheckResponse.SERVING
        stub = teacher_pb2_grpc.TeacherStub(channel)
        info = stub.Info(teacher_pb2.InfoRequest(), timeout=10)
        assert info.vocab_size == 49152 and info.tokenizer_scheme == "byte_level"
        assert info.max_k == 16 and info.architecture == "LlamaForCausalLM"
        text = "Knowledge fusion combines the strengths of several language models."
        reply = next(iter(stub.Score(teacher_pb2.ScoreRequest(texts=[text], k=10), timeout=120)))
        served = TeacherScores.from_bytes(reply.scores)

        backend = HFBackend.load("shipped:smollm2", max_sequence_length=512, max_k=16)
        item = backend.tokenize(text, None)
        with torch.inference_mode():
            logits = backend.model(input_ids=torch.from_numpy(item.ids)[None]).logits[0]
        values, ids = torch.log_softmax(logits.float(), -1).topk(10, -1)
        np.testing.assert_array_equal(served.token_ids, item.ids)
        np.testing.assert_allclose(served.topk_logprobs, values.numpy(), atol=1e-4)
        assert (served.topk_ids == ids.numpy()).mean() > 0.99

        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        assert b"fuseserve_teacher_tokens_scored_total" in body
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
