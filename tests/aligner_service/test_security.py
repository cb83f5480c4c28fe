"""gRPC and REST security: bearer keys on both gRPC services, TLS and mutual TLS, probes.

The guarded aligner serves gRPC over TLS with an API key and calls its teacher over mutual TLS
with the teacher's key; certificates come from a CA made in the test.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseserve import launch
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc, teacher_pb2, teacher_pb2_grpc
from tests.aligner_service.conftest import ALIGNER_KEY, TEACHER_KEY

pytestmark = pytest.mark.slow


def tls(ca, cert=None, key=None):
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def key_md(key):
    return (("authorization", f"Bearer {key}"),)


def test_aligner_grpc_wants_the_key_and_serves_through_mtls_teacher(guarded_aligner, certs):
    with grpc.secure_channel(guarded_aligner.grpc_address, tls(certs.ca)) as channel:
        stub = aligner_pb2_grpc.AlignerStub(channel)
        request = aligner_pb2.FuseRequest(texts=["Secured by a key and TLS."], k=4)
        for metadata in (None, key_md("wrong"), (("authorization", ALIGNER_KEY),)):
            for call in (
                lambda md=metadata: stub.Fuse(request, timeout=30, metadata=md),
                lambda md=metadata: stub.Info(aligner_pb2.InfoRequest(), timeout=30, metadata=md),
                lambda md=metadata: list(stub.FuseStream(iter([request]), timeout=30, metadata=md)),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization: Bearer" in err.value.details()
        # health is open: probes carry no secrets
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # with the key: an answer, computed by the teacher over mutual TLS with its own key
        reply = stub.Fuse(request, timeout=60, metadata=key_md(ALIGNER_KEY))
        assert len(reply.blocks) == 1 and list(reply.blocks[0].teachers) == ["spm"]
        streamed = list(stub.FuseStream(iter([request]), timeout=60, metadata=key_md(ALIGNER_KEY)))
        assert streamed[0].block == reply.blocks[0].block


def test_plaintext_or_untrusting_clients_fail_clearly(guarded_aligner, certs):
    with grpc.insecure_channel(guarded_aligner.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            aligner_pb2_grpc.AlignerStub(channel).Info(
                aligner_pb2.InfoRequest(), timeout=5, metadata=key_md(ALIGNER_KEY)
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(guarded_aligner.grpc_address, tls(certs.other_ca)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            aligner_pb2_grpc.AlignerStub(channel).Info(
                aligner_pb2.InfoRequest(), timeout=5, metadata=key_md(ALIGNER_KEY)
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_teacher_wants_a_client_certificate_and_the_key(secure_teacher, certs):
    address = f"127.0.0.1:{secure_teacher.port}"
    info = teacher_pb2.InfoRequest()
    # TLS without a client certificate: the handshake fails
    with grpc.secure_channel(address, tls(certs.ca)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            teacher_pb2_grpc.TeacherStub(channel).Info(
                info, timeout=5, metadata=key_md(TEACHER_KEY)
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(address, tls(certs.ca, certs.client_cert, certs.client_key)) as ch:
        stub = teacher_pb2_grpc.TeacherStub(ch)
        for metadata in (None, key_md("nope")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Info(info, timeout=5, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                list(
                    stub.Score(
                        teacher_pb2.ScoreRequest(texts=["a b"], k=2), timeout=5, metadata=metadata
                    )
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Info(info, timeout=5, metadata=key_md(TEACHER_KEY)).max_k == 32


def test_rest_key_and_probe_over_tls(guarded_aligner, certs):
    rest = guarded_aligner.rest
    denied = rest.post("/v1/fuse", json={"text": "no key here"})
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "Unauthorized"
    assert rest.get("/v1/teachers").status_code == 401
    auth = {"Authorization": f"Bearer {ALIGNER_KEY}"}
    assert rest.post("/v1/fuse", json={"text": "with the key"}, headers=auth).status_code == 200
    assert rest.get("/readyz").status_code == 200 and rest.get("/metrics").status_code == 200

    def probe(*extra):
        return subprocess.run(
            launch.fuseserve_cmd("probe", "--grpc", guarded_aligner.grpc_address, *extra),
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = probe("--tls-ca", certs.ca)
    assert ok.returncode == 0 and "ready" in ok.stdout, ok.stderr
    plain = probe("--timeout", "2")
    assert plain.returncode == 1 and "not ready" in plain.stdout


def test_trainer_prefetch_reaches_the_guarded_aligner_from_its_environment(
    guarded_aligner, certs, mistral_tok, monkeypatch
):
    """FusedTargetStream with no credentials given reads FUSESERVE_CLIENT_* (a Ray worker's pod
    environment): TLS with the test CA and the aligner's key."""
    import numpy as np

    from fuseserve.trainer.data import Block
    from fuseserve.trainer.prefetch import FusedTargetStream

    text = "Fused targets over TLS for the trainer."
    ids = np.asarray(mistral_tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    blocks = [Block(0, text, ids)]
    monkeypatch.setenv("FUSESERVE_CLIENT_TLS_CA", certs.ca)
    monkeypatch.setenv("FUSESERVE_CLIENT_API_KEY", ALIGNER_KEY)
    stream = FusedTargetStream(guarded_aligner.grpc_address, blocks, iter([0]), timeout_s=60)
    try:
        fused = stream.start().get(blocks[0])
        assert np.array_equal(fused.target_ids[: len(ids)], ids)
    finally:
        stream.close()
    monkeypatch.delenv("FUSESERVE_CLIENT_API_KEY")
    stream = FusedTargetStream(
        guarded_aligner.grpc_address, blocks, iter([0]), timeout_s=60, outage_window_s=0
    )
    try:
        with pytest.raises(Exception, match=r"UNAUTHENTICATED|API key"):
            stream.start().get(blocks[0])
    finally:
        stream.close()
