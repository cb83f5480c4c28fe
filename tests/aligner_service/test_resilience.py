"""Dependencies failing under a running aligner: Redis killed, a teacher killed or replaced."""

from __future__ import annotations

import pytest
import redis

from fuseserve import launch
from fuseserve.launch import wait_until
from tests.service_fixtures import aligner_settings, start_handle, start_teacher

pytestmark = pytest.mark.slow


def test_redis_killed_mid_test_leaves_the_service_answering(
    service_loop, teacher_procs, vocab_dir, logs
):
    own_redis = launch.start_redis(logs)
    port = own_redis.port
    settings = aligner_settings(teacher_procs, vocab_dir, redis_url=f"redis://127.0.0.1:{port}/0")
    handle = start_handle(service_loop, settings)
    try:
        first = handle.rest.post("/v1/fuse", json={"text": "Cached in Redis, first of all."})
        assert first.status_code == 200
        assert redis.Redis(port=port).dbsize() == 3  # two teachers' scores and the fused block
        assert handle.rest.get("/readyz").json()["cache"] == "ok"
        assert handle.metric("fuseserve_aligner_cache_up", {}) == 1

        own_redis.kill()
        for i in range(3):
            answer = handle.rest.post("/v1/fuse", json={"text": f"Redis is gone, text {i}."})
            assert answer.status_code == 200, answer.text
        again = handle.rest.post("/v1/fuse", json={"text": "Cached in Redis, first of all."})
        assert again.status_code == 200 and not again.json()["blocks"][0]["cache_hit"]
        errors = handle.metric("fuseserve_aligner_cache_errors_total", {"op": "get"})
        assert errors >= 1
        # a dead cache is visible (not only in the log) but does not make the aligner unready
        readyz = handle.rest.get("/readyz")
        assert readyz.status_code == 200 and readyz.json()["cache"].startswith("unreachable: ")
        assert handle.metric("fuseserve_aligner_cache_up", {}) == 0

        own_redis = launch.start_redis(logs, port=port)
        client = redis.Redis(port=port)

        def recovered():
            r = handle.rest.post("/v1/fuse", json={"text": "Redis is back, cache me."})
            assert r.status_code == 200
            return client.dbsize() > 0

        wait_until(recovered, 15, "the aligner to write to the restarted Redis")
        hit = handle.rest.post("/v1/fuse", json={"text": "Redis is back, cache me."})
        assert hit.json()["blocks"][0]["cache_hit"]
        assert handle.rest.get("/readyz").json()["cache"] == "ok"
        assert handle.metric("fuseserve_aligner_cache_up", {}) == 1
    finally:
        handle.close()
        own_redis.stop()


def test_teacher_killed_gives_503_naming_it_then_recovers(aligner, teacher_procs, tiny_dirs, logs):
    """SIGKILL one teacher: the health watch shows it down everywhere (/v1/teachers, gRPC Info,
    teacher_ready, /readyz, the aligner's gRPC health) and requests fail at once naming it;
    /readyz follows ``ready_min_teachers``; after a restart everything is ready again."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc

    def bpe_status():
        return next(t for t in aligner.rest.get("/v1/teachers").json() if t["name"] == "bpe")

    def grpc_view():
        with grpc.insecure_channel(aligner.grpc_address) as channel:
            info = aligner_pb2_grpc.AlignerStub(channel).Info(aligner_pb2.InfoRequest(), timeout=10)
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        ready = {t.name: t.ready for t in info.teachers}
        return ready, health.status == health_pb2.HealthCheckResponse.SERVING

    assert bpe_status()["ready"] and grpc_view() == ({"spm": True, "bpe": True}, True)
    bpe = teacher_procs["bpe"]
    bpe.kill()
    # generous bound: proves the outage is seen without a request, not a latency figure
    wait_until(lambda: not bpe_status()["ready"], 20, "/v1/teachers to show 'bpe' down")
    assert "'bpe' is not serving" in bpe_status()["problem"]
    assert aligner.metric("fuseserve_aligner_teacher_ready", {"teacher": "bpe"}) == 0
    assert aligner.metric("fuseserve_aligner_teacher_ready", {"teacher": "spm"}) == 1
    assert grpc_view() == ({"spm": True, "bpe": False}, False)
    readyz = aligner.rest.get("/readyz")
    assert readyz.status_code == 503 and "bpe" in readyz.json()["teachers"]
    settings = aligner.service.pool.settings  # read where used: a change applies at once
    settings.ready_min_teachers = 1  # the policy "ready while >= 1 teacher serves"
    try:
        assert aligner.rest.get("/readyz").status_code == 200
    finally:
        settings.ready_min_teachers = 0

    down = aligner.rest.post("/v1/fuse", json={"text": "A teacher has gone away."})
    assert down.status_code == 503, down.text
    assert "'bpe'" in down.json()["error"]["message"]
    only_spm = aligner.rest.post("/v1/fuse", json={"text": "Just spm.", "teachers": ["spm"]})
    assert only_spm.status_code == 200
    with grpc.insecure_channel(aligner.grpc_address) as channel:
        stub = aligner_pb2_grpc.AlignerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Fuse(aligner_pb2.FuseRequest(texts=["A teacher has gone away."]), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "'bpe'" in err.value.details()

    restarted = start_teacher("bpe", tiny_dirs["bpe"], logs, port=bpe.port)
    teacher_procs["bpe"] = restarted
    launch.wait_grpc_serving(restarted, 180)
    wait_until(lambda: bpe_status()["ready"], 30, "the aligner to see 'bpe' back")
    assert aligner.rest.get("/readyz").status_code == 200
    assert grpc_view() == ({"spm": True, "bpe": True}, True)
    assert aligner.metric("fuseserve_aligner_teacher_ready", {"teacher": "bpe"}) == 1
    back = aligner.rest.post("/v1/fuse", json={"text": "And it came back."})
    assert back.status_code == 200, back.text


def test_teacher_with_a_new_tokenizer_is_detected(aligner, teacher_procs, tiny_dirs, logs):
    """Replace teacher 'bpe' by a WordPiece model on the same address: refresh rebuilds its map."""
    text = "Same address, different tokenizer."
    before = aligner.rest.post("/v1/fuse", json={"text": text})
    assert before.status_code == 200
    old = teacher_procs["bpe"]
    old_fp = aligner.service.pool.teachers["bpe"].view.fingerprint
    old.stop()
    replaced = start_teacher("bpe", tiny_dirs["wp"], logs, port=old.port)
    teacher_procs["bpe"] = replaced
    try:
        launch.wait_grpc_serving(replaced, 180)
        aligner.loop.run(aligner.service.pool.refresh())
        teacher = aligner.service.pool.teachers["bpe"]
        assert teacher.ready and teacher.view.fingerprint != old_fp
        assert str(teacher.view.scheme) == "wordpiece"
        after = aligner.rest.post("/v1/fuse", json={"text": text})
        assert after.status_code == 200
        # the teacher's fingerprint is part of the key: not served from the old cache entry
        assert not after.json()["blocks"][0]["cache_hit"]
        assert after.json()["blocks"][0]["teachers"] != before.json()["blocks"][0]["teachers"]
    finally:
        replaced.stop()
        restored = start_teacher("bpe", tiny_dirs["bpe"], logs, port=old.port)
        teacher_procs["bpe"] = restored
        launch.wait_grpc_serving(restored, 180)
        aligner.loop.run(aligner.service.pool.refresh())
    assert aligner.service.pool.teachers["bpe"].view.fingerprint == old_fp
