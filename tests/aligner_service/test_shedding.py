"""Load shedding: admission by what the teachers can finish in time, fast 429 with Retry-After,
no retry into an overloaded teacher, and a failed request cancelling its sibling teacher calls.

Two in-process teachers (the tiny spm and bpe models) whose forward passes wait at a gate the
test opens and closes, so the teachers can be held busy at will.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from fuseserve.launch import wait_until
from fuseserve.teacher.hf_backend import HFBackend
from fuseserve.teacher.server import start_server
from fuseserve.teacher.settings import TeacherSettings
from fuseserve.wire.v1 import aligner_pb2, teacher_pb2, teacher_pb2_grpc
from tests.aligner_service.test_service import stub_for
from tests.service_fixtures import aligner_settings, start_handle
from tests.teacher.conftest import GatedBackend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gated(service_loop, tiny_dirs):
    async def start(name, **overrides):
        backend = GatedBackend(
            HFBackend.load(str(tiny_dirs[name]), max_sequence_length=1024, max_k=32)
        )
        settings = TeacherSettings(port=0, metrics_port=0, max_k=32, batch_wait_ms=0, **overrides)
        running = await start_server(settings)
        await running.set_backend(backend)
        return SimpleNamespace(running=running, backend=backend, port=running.port)

    teachers = {
        "spm": service_loop.run(start("spm")),
        "bpe": service_loop.run(start("bpe", max_queue_sequences=1)),
    }
    yield teachers
    for t in teachers.values():
        t.backend.gate.set()
        service_loop.run(t.running.stop(1.0))


@pytest.fixture(scope="module")
def shedder(service_loop, gated, vocab_dir):
    settings = aligner_settings(
        gated, vocab_dir, request_deadline_s=0.001, teacher_retries=2, redis_url=None
    )
    handle = start_handle(service_loop, settings)
    yield handle
    handle.close()


def teacher_metric(t, name):
    return t.running.metrics.registry.get_sample_value(name) or 0.0


def refused(handle, text: str, needle: str) -> None:
    """POST ``text``: a 429 with Retry-After whose message holds ``needle``, without a hang."""
    start = time.perf_counter()
    shed = handle.rest.post("/v1/fuse", json={"text": text})
    assert time.perf_counter() - start < 10  # generous: proves no wait, not a latency figure
    assert shed.status_code == 429, shed.text
    assert needle in shed.json()["error"]["message"]
    assert int(shed.headers["Retry-After"]) >= 1


def direct_score(t, text):
    with grpc.insecure_channel(f"127.0.0.1:{t.port}") as channel:
        request = teacher_pb2.ScoreRequest(texts=[text], k=2)
        return list(teacher_pb2_grpc.TeacherStub(channel).Score(request, timeout=120))


def test_overloaded_teacher_is_not_retried_and_siblings_are_cancelled(shedder, gated):
    spm, bpe = gated["spm"], gated["bpe"]
    spm_tokens = teacher_metric(spm, "fuseserve_teacher_tokens_scored_total")
    holder_text = "holding the spm teacher busy"
    for t in (spm, bpe):
        t.backend.gate.clear()
        t.backend.busy.clear()
    try:
        with ThreadPoolExecutor(3) as pool:
            holders = [pool.submit(direct_score, spm, holder_text)]
            holders.append(pool.submit(direct_score, bpe, "holding the bpe teacher busy"))
            depth = "fuseserve_teacher_queue_depth"
            assert spm.backend.busy.wait(30) and bpe.backend.busy.wait(30)
            holders.append(pool.submit(direct_score, bpe, "filling the queue of bpe"))
            wait_until(lambda: teacher_metric(bpe, depth) == 1, 30, "bpe's queue full")

            # at once, not after retries and backoff
            refused(shedder, "a request bpe cannot take", "'bpe'")
            calls = shedder.metric(
                "fuseserve_aligner_teacher_calls_total",
                {"teacher": "bpe", "outcome": "resource_exhausted"},
            )
            assert calls == 1  # one replica: never retried into the same teacher
            # the spm call of the failed request was cancelled; let everything go
            spm.backend.gate.set()
            bpe.backend.gate.set()
            for h in holders:
                h.result(60)
        wait_until(lambda: teacher_metric(spm, depth) == 0, 30, "spm's queue to drain")
        held = len(spm.backend.tokenize(holder_text, None).ids)
        # only the holder was ever computed on spm: the sibling call never was
        assert teacher_metric(spm, "fuseserve_teacher_tokens_scored_total") == spm_tokens + held
    finally:
        spm.backend.gate.set()
        bpe.backend.gate.set()


def test_admission_sheds_at_once_with_retry_after(shedder, gated):
    spm = gated["spm"]
    for i in range(3):  # measured rates
        ok = shedder.rest.post("/v1/fuse", json={"text": f"warming up the rate, text {i}"})
        assert ok.status_code == 200, ok.text
    assert shedder.service.pool.teachers["spm"].load.rate > 0
    spm.backend.gate.clear()
    try:
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(
                shedder.rest.post, "/v1/fuse", json={"text": "in flight while spm is held"}
            )
            load = shedder.service.pool.teachers["spm"].load
            wait_until(lambda: load.inflight >= 1, 30, "a block in flight at spm")
            calls = shedder.metric(
                "fuseserve_aligner_teacher_calls_total", {"teacher": "spm", "outcome": "ok"}
            )
            # REST: refused before parsing (this process has a block in flight it measured the
            # rate of); gRPC: by spm's backlog, the first check of admission
            refused(shedder, "no room for this one", "interactive_deadline_s")  # no teacher work
            stub, channel = stub_for(shedder)
            with channel, pytest.raises(grpc.RpcError) as err:
                stub.Fuse(aligner_pb2.FuseRequest(texts=["nor for this one"]), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "teacher 'spm'" in err.value.details()
            assert "interactive_deadline_s" in err.value.details()
            assert dict(err.value.trailing_metadata())["retry-after"].isdigit()
            # a FuseStream request (a trainer's) is admitted by request_deadline_s instead
            stub, channel = stub_for(shedder)
            stream = stub.FuseStream(iter([aligner_pb2.FuseRequest(texts=["streamed"])]))
            with channel, pytest.raises(grpc.RpcError) as err:
                list(stream)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "request_deadline_s" in err.value.details()
            assert shedder.metric("fuseserve_aligner_shed_total", {"teacher": "spm"}) >= 1
            spm.backend.gate.set()
            assert inflight.result(60).status_code == 200
        after = shedder.metric(
            "fuseserve_aligner_teacher_calls_total", {"teacher": "spm", "outcome": "ok"}
        )
        assert after == calls + 1  # the shed requests never reached the teacher
    finally:
        spm.backend.gate.set()


def test_refusal_comes_before_the_body_is_parsed(shedder, gated):
    """While no teacher could take one more block in time, POST /v1/fuse is refused before
    its body is parsed (so a refusal costs the event loop almost nothing): even a body that is
    not JSON gets the 429; once the teachers are free, the same body gets its 4xx."""
    for i in range(2):  # measured rates on both teachers
        ok = shedder.rest.post("/v1/fuse", json={"text": f"warming both teachers, text {i}"})
        assert ok.status_code == 200, ok.text
    for t in gated.values():
        t.backend.gate.clear()
    broken = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    try:
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(
                shedder.rest.post, "/v1/fuse", json={"text": "both teachers hold this one"}
            )
            for name in gated:
                load = shedder.service.pool.teachers[name].load
                wait_until(lambda load=load: load.inflight >= 1, 30, f"a block at {name}")
            shed = shedder.rest.post("/v1/fuse", **broken)
            assert shed.status_code == 429, shed.text
            assert shed.json()["error"]["type"] == "Overloaded"
            assert int(shed.headers["Retry-After"]) >= 1
            for t in gated.values():
                t.backend.gate.set()
            assert inflight.result(60).status_code == 200
        parsed = shedder.rest.post("/v1/fuse", **broken)
        assert 400 <= parsed.status_code < 500 and parsed.status_code != 429, parsed.text
    finally:
        for t in gated.values():
            t.backend.gate.set()


def test_the_aligner_sheds_by_its_own_rate_too(shedder, gated):
    """A bottleneck in this process (not the teachers) also bounds admission: with a measured
    rate and a block in flight past the deadline, a request is refused naming the aligner."""
    for i in range(2):
        ok = shedder.rest.post("/v1/fuse", json={"text": f"measuring the aligner, text {i}"})
        assert ok.status_code == 200, ok.text
    load = shedder.service.load
    assert load.rate > 0 and load.inflight == 0
    load.start(1)  # a block this process has not answered yet
    try:
        shed = shedder.rest.post("/v1/fuse", json={"text": "no time for this one"})
    finally:
        load.finish(1)
    assert shed.status_code == 429, shed.text
    assert "the aligner has 1 blocks in flight" in shed.json()["error"]["message"]
    assert shedder.metric("fuseserve_aligner_shed_total", {"teacher": "(aligner)"}) >= 1
    assert shedder.rest.post("/v1/fuse", json={"text": "room again"}).status_code == 200


def test_a_request_for_every_teacher_is_refused_early_when_one_is_behind(shedder, gated):
    """With spm held (bpe free), a body that cannot name a subset of teachers needs spm, so it
    is refused before parsing (even when it is not JSON); a body that names bpe is served."""
    for i in range(2):  # measured rates on both teachers
        ok = shedder.rest.post("/v1/fuse", json={"text": f"warming for the subset, text {i}"})
        assert ok.status_code == 200, ok.text
    spm = gated["spm"]
    spm.backend.gate.clear()
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(
                direct_score, spm, "holding spm while the aligner's own queue is empty"
            )
            load = shedder.service.pool.teachers["spm"].load
            load.start(1)  # the aligner sees a block in flight at spm (its own measured rate)
            try:
                shed = shedder.rest.post(
                    "/v1/fuse", content=b"{not json", headers={"content-type": "application/json"}
                )
                assert shed.status_code == 429, shed.text
                assert "teacher 'spm'" in shed.json()["error"]["message"]
                only_bpe = shedder.rest.post(
                    "/v1/fuse", json={"text": "only for bpe", "teachers": ["bpe"]}
                )
                assert only_bpe.status_code == 200, only_bpe.text
            finally:
                load.finish(1)
                spm.backend.gate.set()
            held.result(60)
    finally:
        spm.backend.gate.set()


def test_a_block_refused_at_its_second_admission_does_not_hang_the_next_caller(
    aligner, service_loop, monkeypatch
):
    """A block that missed the cache is claimed (identical concurrent blocks wait for it), then
    admitted again for the teachers; a refusal there must release the claim, or every later
    request for the same block waits forever (seen as an export stuck at 1 block in flight)."""
    from fuseserve.errors import Overloaded

    service = aligner.service
    real_admit = service._admit
    refusals = []

    def refuse_the_teachers_once(query, n, this_process=True):
        if not this_process and not refusals:
            refusals.append(n)
            raise Overloaded("refused at the second admission (test)")
        return real_admit(query, n, this_process)

    monkeypatch.setattr(service, "_admit", refuse_the_teachers_once)
    query = service.query([f"a block refused once, then asked again {time.time_ns()}"])
    with pytest.raises(Overloaded):
        service_loop.run(service.fuse(query), timeout=60)
    assert refusals == [1]
    (again,) = service_loop.run(service.fuse(query), timeout=60)  # no hang: computed this time
    assert again.source == "computed" and service.inflight == 0
