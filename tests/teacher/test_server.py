"""The teacher gRPC server with a tiny real model: answers, concurrency, limits, health."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseserve.wire.messages import TeacherScores
from fuseserve.wire.v1 import teacher_pb2, teacher_pb2_grpc
from tests.teacher.conftest import start_teacher

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Knowledge fusion of large language models, 2024 édition ꙮ.",
]


def stub_for(running):
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    return teacher_pb2_grpc.TeacherStub(channel), channel


def score(stub, texts, k=8, **kw):
    request = teacher_pb2.ScoreRequest(texts=texts, k=k, **kw)
    replies = list(stub.Score(request, timeout=60))
    assert [r.index for r in replies] == list(range(len(texts)))
    return [TeacherScores.from_bytes(r.scores) for r in replies], replies


def reference(backend, text, k):
    """In-process forward + top-k of the same model on the same tokens."""
    item = backend.tokenize(text, None)
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.from_numpy(item.ids)[None]).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    values, ids = logp.topk(k, -1)
    gold = logp[:-1].gather(1, torch.from_numpy(item.ids[1:])[:, None])[:, 0]
    return item, values.numpy(), ids.numpy(), gold.numpy()


def assert_matches(scores: TeacherScores, ref, atol=1e-5):
    item, values, ids, gold = ref
    np.testing.assert_array_equal(scores.token_ids, item.ids)
    np.testing.assert_array_equal(scores.offsets, item.offsets)
    np.testing.assert_allclose(scores.topk_logprobs, values, atol=atol)
    same = scores.topk_ids == ids
    # ids may differ only where two log-probs tie
    for r, c in zip(*np.nonzero(~same)):
        assert (
            abs(values[r, c] - values[r, min(c + 1, ids.shape[1] - 1)]) < 1e-6
            or abs(values[r, c] - values[r, max(c - 1, 0)]) < 1e-6
        )
    np.testing.assert_allclose(scores.gold_logprobs[:-1], gold, atol=atol)
    assert np.isnan(scores.gold_logprobs[-1])


def test_info_and_vocab(teacher, tiny_backend):
    stub, channel = stub_for(teacher)
    info = stub.Info(teacher_pb2.InfoRequest(), timeout=10)
    assert info.backend == "hf" and info.architecture == "LlamaForCausalLM"
    assert info.vocab_size == 32000 and info.tokenizer_scheme == "sentencepiece"
    assert info.tokenizer_fingerprint == tiny_backend.view.fingerprint
    assert info.max_k == 32 and info.device == "cpu" and info.dtype == "float32"
    assert info.bos_id == 1 and info.eos_id == 2
    tokens = []
    for chunk in stub.Vocab(teacher_pb2.VocabRequest(chunk_size=5000), timeout=10):
        assert chunk.start_id == len(tokens)
        tokens.extend(chunk.tokens)
    assert tuple(tokens) == tiny_backend.view.tokens
    channel.close()


def test_served_topk_equals_in_process_forward(teacher, tiny_backend):
    stub, channel = stub_for(teacher)
    results, replies = score(stub, TEXTS, k=8)
    for text, got, reply in zip(TEXTS, results, replies):
        assert_matches(got, reference(tiny_backend, text, 8))
        assert reply.num_tokens == len(got.token_ids) and not reply.truncated
    half, _ = score(stub, TEXTS[:1], k=8, float_dtype="f16")
    np.testing.assert_allclose(half[0].topk_logprobs, results[0].topk_logprobs, atol=2e-2)
    channel.close()


def test_concurrent_callers_get_serial_answers(teacher):
    stub, channel = stub_for(teacher)
    texts = [f"{TEXTS[i % 3]} variant {i}" for i in range(32)]
    serial = [score(stub, [t], k=4 + i % 5)[0][0] for i, t in enumerate(texts)]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(
            pool.map(lambda it: score(stub, [it[1]], k=4 + it[0] % 5)[0][0], enumerate(texts))
        )
    for a, b in zip(serial, concurrent):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(a.gold_logprobs, b.gold_logprobs, atol=1e-5)
    channel.close()


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"texts": []}, "texts"),
        ({"texts": ["ok text", ""]}, "texts[1]"),
        ({"texts": ["ok text"], "k": 0}, "k"),
        ({"texts": ["ok text"], "k": 33}, "k"),
        ({"texts": ["word " * 400]}, "texts[0]"),
        ({"texts": ["ok text"] * 65}, "texts"),
        ({"texts": ["ok text"], "float_dtype": "f64"}, "float_dtype"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(teacher, request_kwargs, field):
    stub, channel = stub_for(teacher)
    request_kwargs.setdefault("k", 4)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Score(teacher_pb2.ScoreRequest(**request_kwargs), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)
    assert score(stub, ["still serving"], k=2)[0][0].k == 2
    channel.close()


def test_truncate_instead_of_reject(teacher):
    stub, channel = stub_for(teacher)
    results, replies = score(stub, ["word " * 400], k=3, too_long=teacher_pb2.TOO_LONG_TRUNCATE)
    assert replies[0].truncated and results[0].truncated
    assert len(results[0].token_ids) == 256
    channel.close()


def test_full_queue_is_resource_exhausted_at_once(loop_thread, tiny_backend):
    running = start_teacher(loop_thread, tiny_backend, max_queue_sequences=4, max_batch_texts=8)
    stub, channel = stub_for(running)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Score(teacher_pb2.ScoreRequest(texts=["a b c"] * 5, k=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(score(stub, ["a b c"] * 4, k=2)[0]) == 4  # and it keeps serving
    channel.close()
    loop_thread.run(running.stop(1.0))


def test_health_is_not_serving_until_a_model_is_attached(loop_thread, tiny_backend):
    running = start_teacher(loop_thread, None)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        teacher_pb2_grpc.TeacherStub(channel).Info(teacher_pb2.InfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    loop_thread.run(running.set_backend(tiny_backend))
    for service in ("", "fuseserve.teacher.v1.Teacher"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    loop_thread.run(running.stop(1.0))


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff not a message",
        teacher_pb2.ScoreRequest(texts=["x"], k=2).SerializeToString().replace(b"x", b"\xff"),
    ],
)
def test_malformed_payload_is_invalid_argument(teacher, payload):
    with grpc.insecure_channel(f"127.0.0.1:{teacher.port}") as channel:
        score = channel.unary_stream("/fuseserve.teacher.v1.Teacher/Score")
        with pytest.raises(grpc.RpcError) as err:
            list(score(payload, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("request: not a valid message")
        info = channel.unary_unary("/fuseserve.teacher.v1.Teacher/Info")
        with pytest.raises(grpc.RpcError) as err:
            info(b"\xff\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_texts_over_max_text_chars_are_rejected_before_tokenising(teacher):
    stub, channel = stub_for(teacher)
    with channel:
        request = teacher_pb2.ScoreRequest(texts=["ok", "z" * 300_000], k=2)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Score(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "texts[1]: 300000 characters exceed max_text_chars=262144"
        assert len(score(stub, ["still serving"], k=2)[0]) == 1


def test_sequences_of_callers_that_have_gone_are_never_computed(loop_thread, tiny_backend):
    """While the model is busy, callers whose deadline passes are dropped from the queue
    before any compute: only the first request's tokens are ever scored."""
    from tests.teacher.conftest import GatedBackend

    gated = GatedBackend(tiny_backend)
    running = start_teacher(loop_thread, gated, batch_wait_ms=0.0)
    metrics = running.metrics.registry
    stub, channel = stub_for(running)
    try:
        gated.gate.clear()
        gated.busy.clear()
        with ThreadPoolExecutor(1) as pool:  # the holder's batch waits at the gate
            holder = pool.submit(score, stub, ["the one that is computed"], 2)
            # the holder's batch is at the gate, so what comes next waits in the queue
            assert gated.busy.wait(30), "the holder's batch never reached the model"
            for _ in range(3):
                request = teacher_pb2.ScoreRequest(texts=["gone before it ran", "me too"], k=2)
                with pytest.raises(grpc.RpcError) as err:
                    # long enough to reach the queue on a loaded machine (0.3 s was not: a
                    # request could expire before the server queued it, and was not counted)
                    list(stub.Score(request, timeout=2.0))
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gated.gate.set()
            (result,), _ = holder.result(60)
        assert score(stub, ["scored afterwards too"], 2)[0]  # and the batcher goes on
        dropped = metrics.get_sample_value("fuseserve_teacher_dropped_sequences_total")
        assert dropped == 6
        scored = metrics.get_sample_value("fuseserve_teacher_tokens_scored_total")
        afterwards = len(tiny_backend.tokenize("scored afterwards too", None).ids)
        assert scored == len(result.token_ids) + afterwards
    finally:
        gated.gate.set()
        channel.close()
        loop_thread.run(running.stop(1.0))


def test_an_oversize_request_is_invalid_argument_naming_the_limit(loop_thread, tiny_backend):
    """Over the limit: the caller's mistake (INVALID_ARGUMENT, never retried); over twice the
    limit gRPC itself refuses with RESOURCE_EXHAUSTED, which the translator still reads as the
    caller's mistake."""
    from fuseserve.errors import InvalidRequest
    from fuseserve.wire.status import error_from_rpc, retryable

    limit = 1024 * 1024
    running = start_teacher(loop_thread, tiny_backend, max_message_bytes=limit)
    stub, channel = stub_for(running)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Score(teacher_pb2.ScoreRequest(texts=["x" * (limit + 10)], k=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_message_bytes={limit}" in err.value.details()
    assert dict(err.value.trailing_metadata())["fuseserve-field"] == "request"
    assert not retryable(err.value)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Score(teacher_pb2.ScoreRequest(texts=["x" * (3 * limit)], k=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not retryable(err.value)
    error = error_from_rpc(err.value)
    assert isinstance(error, InvalidRequest) and error.field == "request"
    assert len(score(stub, ["still serving"], k=2)[0]) == 1
    channel.close()
    loop_thread.run(running.stop(1.0))
