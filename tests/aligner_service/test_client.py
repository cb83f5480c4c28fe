"""``fuseserve.client`` against the running aligner: REST JSON, REST binary and gRPC, sync and
async, give identical arrays; content negotiation; the cut (top-n, position range); a caller
that disconnects cancels its work."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest

from fuseserve.client import (
    MEDIA_TYPE,
    AsyncGrpcClient,
    AsyncRestClient,
    FuseError,
    FuseParams,
    GrpcClient,
    RestClient,
)
from fuseserve.launch import wait_until
from fuseserve.teacher.hf_backend import HFBackend
from fuseserve.teacher.server import start_server
from fuseserve.teacher.settings import TeacherSettings
from fuseserve.wire.fuse_reply import decode_reply
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc, teacher_pb2, teacher_pb2_grpc
from tests.service_fixtures import aligner_settings, start_handle
from tests.teacher.conftest import GatedBackend

pytestmark = pytest.mark.slow


def assert_same(a, b) -> None:
    """Two ``FuseReply`` with identical blocks (arrays, offsets, teachers)."""
    assert len(a.blocks) == len(b.blocks)
    for x, y in zip(a.blocks, b.blocks):
        assert (x.index, x.start) == (y.index, y.start)
        assert x.block.teachers == y.block.teachers
        for name in ("target_ids", "ids", "probs", "tail", "chosen", "ce", "coverage"):
            left, right = getattr(x.block, name), getattr(y.block, name)
            assert left.dtype == right.dtype, name
            np.testing.assert_array_equal(left, right, err_msg=name)


@pytest.fixture(scope="module")
def texts(prose):
    return [prose[:1200], prose[1200:1900]]


def every_transport(aligner, texts, params):
    url = str(aligner.rest.base_url)
    with RestClient(url, binary=True) as rest:
        binary = rest.fuse(texts, params)
        json_ = rest.fuse(texts, params, binary=False)
    with GrpcClient(aligner.grpc_address, timeout_s=120) as grpc_client:
        grpc_ = grpc_client.fuse(texts, params)

    async def both_async():
        async with AsyncRestClient(url) as a_rest, AsyncGrpcClient(aligner.grpc_address) as a_grpc:
            return await a_rest.fuse(texts, params), await a_grpc.fuse(texts, params)

    return binary, json_, grpc_, *asyncio.run(both_async())


@pytest.mark.parametrize(
    "params",
    [
        FuseParams(k=8, top=5, start=3, end=40, float_dtype="f32"),
        FuseParams(k=8, top=None, float_dtype="f32"),
        FuseParams(k=8, top=3, start=100_000, float_dtype="f32"),  # past the end: no rows
    ],
)
def test_rest_json_rest_binary_and_grpc_give_identical_arrays(aligner, texts, params):
    binary, json_, grpc_, async_rest, async_grpc = every_transport(aligner, texts, params)
    for other in (json_, grpc_, async_rest, async_grpc):
        assert_same(binary, other)
    first = binary.blocks[0]
    n = len(first.block.target_ids)
    if params.end is not None:
        assert (first.start, n) == (params.start, params.end - params.start)
    if params.top is not None:
        assert first.block.ids.shape[1] <= params.top
    probs = first.block.probs
    assert np.all(np.diff(probs, axis=1)[first.block.ids[:, 1:] >= 0] <= 0)  # best first
    assert (
        binary.target_fingerprint == grpc_.target_fingerprint == aligner.service.target.fingerprint
    )
    assert binary.k == json_.k == 8 and binary.options == json_.options


def test_f16_binary_is_the_f32_answer_rounded(aligner, texts):
    with RestClient(str(aligner.rest.base_url)) as rest:
        half = rest.fuse(texts[0], FuseParams(top=5))
        full = rest.fuse(texts[0], FuseParams(top=5, float_dtype="f32"))
    np.testing.assert_array_equal(half.blocks[0].block.ids, full.blocks[0].block.ids)
    np.testing.assert_allclose(half.blocks[0].block.probs, full.blocks[0].block.probs, atol=1e-3)


def test_binary_size_is_a_fixed_part_plus_rows_plus_six_bytes_per_listed_entry(aligner, texts):
    response = aligner.rest.post(
        "/v1/fuse", json={"text": texts[0], "top": 5}, headers={"accept": MEDIA_TYPE}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == MEDIA_TYPE and response.headers["vary"] == "Accept"
    block = decode_reply(response.content).blocks[0].block
    n, slots = block.ids.shape
    assert slots == 5
    listed = int((block.ids >= 0).sum())
    assert len(response.content) <= 1024 + 9 * n + 6 * listed


def test_accept_chooses_the_format_and_anything_else_is_406(aligner, texts):
    body = {"text": texts[0], "top": 2}
    plain = aligner.rest.post("/v1/fuse", json=body)  # httpx sends Accept: */*
    assert plain.headers["content-type"] == "application/json"
    weighted = f"application/json;q=0.5, {MEDIA_TYPE}"
    binary = aligner.rest.post("/v1/fuse", json=body, headers={"accept": weighted})
    assert binary.headers["content-type"] == MEDIA_TYPE
    refused = aligner.rest.post("/v1/fuse", json=body, headers={"accept": "text/html"})
    assert refused.status_code == 406
    error = refused.json()["error"]
    assert error["type"] == "NotAcceptable" and error["message"].startswith("Accept:")


def test_a_bad_range_is_422_naming_end_and_errors_reach_the_client(aligner, texts):
    with RestClient(str(aligner.rest.base_url)) as rest, pytest.raises(FuseError) as err:
        rest.fuse(texts[0], FuseParams(start=10, end=10))
    assert (err.value.status, err.value.field) == (422, "end")
    client = GrpcClient(aligner.grpc_address, timeout_s=60)
    with client, pytest.raises(FuseError) as err:
        client.fuse(texts[0], FuseParams(k=100_000))
    assert (err.value.status, err.value.field) == ("INVALID_ARGUMENT", "k")


# ---------------------------------------------------------------- a caller that goes away


@pytest.fixture(scope="module")
def gated_aligner(service_loop, tiny_dirs, vocab_dir):
    """An aligner over one in-process teacher whose forward passes wait at a gate."""

    async def start():
        backend = GatedBackend(
            HFBackend.load(str(tiny_dirs["spm"]), max_sequence_length=1024, max_k=32)
        )
        settings = TeacherSettings(port=0, metrics_port=0, max_k=32, batch_wait_ms=0)
        running = await start_server(settings)
        await running.set_backend(backend)
        return SimpleNamespace(running=running, backend=backend, port=running.port)

    teacher = service_loop.run(start())
    handle = start_handle(service_loop, aligner_settings({"spm": teacher}, vocab_dir))
    yield handle, teacher
    teacher.backend.gate.set()
    handle.close()
    service_loop.run(teacher.running.stop(1.0))


def teacher_metric(teacher, name):
    return teacher.running.metrics.registry.get_sample_value(name) or 0.0


def hold(teacher, text: str):
    """A direct Score call that keeps the gated teacher's forward pass busy."""
    with grpc.insecure_channel(f"127.0.0.1:{teacher.port}") as channel:
        request = teacher_pb2.ScoreRequest(texts=[text], k=2)
        return list(teacher_pb2_grpc.TeacherStub(channel).Score(request, timeout=120))


def test_a_rest_caller_that_disconnects_cancels_its_teacher_calls(gated_aligner):
    handle, teacher = gated_aligner
    dropped_metric = "fuseserve_teacher_dropped_sequences_total"
    dropped = teacher_metric(teacher, dropped_metric)
    teacher.backend.gate.clear()
    teacher.backend.busy.clear()
    try:
        with ThreadPoolExecutor(1) as pool:
            holder = pool.submit(hold, teacher, "holding the teacher busy")
            assert teacher.backend.busy.wait(30)
            body = b'{"text": "a caller that leaves before its answer"}'
            sock = socket.create_connection(("127.0.0.1", handle.running.rest_port), timeout=30)
            sock.sendall(
                b"POST /v1/fuse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            depth = "fuseserve_teacher_queue_depth"
            wait_until(lambda: teacher_metric(teacher, depth) == 1, 30, "the call queued")
            assert handle.service.inflight == 1
            sock.close()  # the caller goes away
            # cancelled while the teacher is still held: nothing waits for its answer
            wait_until(lambda: handle.service.inflight == 0, 30, "in-flight blocks back to 0")
            cancelled = {"transport": "rest", "outcome": "cancelled"}
            assert handle.metric("fuseserve_aligner_requests_total", cancelled) == 1
            teacher.backend.gate.set()
            holder.result(60)
    finally:
        teacher.backend.gate.set()
    # the teacher drops the gone caller's queued sequence instead of computing it
    wait_until(lambda: teacher_metric(teacher, dropped_metric) > dropped, 30, "a dropped sequence")


def test_a_client_that_times_out_leaves_nothing_in_flight(gated_aligner):
    handle, teacher = gated_aligner
    teacher.backend.gate.clear()
    try:
        rest = RestClient(str(handle.rest.base_url), timeout_s=1.0)
        with rest, pytest.raises(httpx.TimeoutException):
            rest.fuse("a caller with a short deadline")
        wait_until(lambda: handle.service.inflight == 0, 30, "in-flight blocks back to 0")
    finally:
        teacher.backend.gate.set()


def test_cancelled_grpc_calls_are_counted(gated_aligner):
    """A Fuse call past its deadline and a FuseStream the caller cancels each count as
    ``outcome="cancelled"`` and leave nothing in flight."""
    handle, teacher = gated_aligner
    cancelled = {"transport": "grpc", "outcome": "cancelled"}
    before = handle.metric("fuseserve_aligner_requests_total", cancelled)
    teacher.backend.gate.clear()
    try:
        with grpc.insecure_channel(handle.grpc_address) as channel:
            stub = aligner_pb2_grpc.AlignerStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Fuse(aligner_pb2.FuseRequest(texts=["a caller out of time"]), timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(
                lambda: handle.metric("fuseserve_aligner_requests_total", cancelled) == before + 1,
                30,
                "the cancelled Fuse call counted",
            )
            stream = stub.FuseStream(iter([aligner_pb2.FuseRequest(texts=["a stream"])]))
            wait_until(lambda: handle.service.inflight == 1, 30, "the stream's block in flight")
            stream.cancel()
            wait_until(
                lambda: handle.metric("fuseserve_aligner_requests_total", cancelled) == before + 2,
                30,
                "the cancelled stream counted",
            )
        wait_until(lambda: handle.service.inflight == 0, 30, "in-flight blocks back to 0")
    finally:
        teacher.backend.gate.set()
