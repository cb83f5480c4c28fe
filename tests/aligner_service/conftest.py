"""The aligner service fixtures live in tests/service_fixtures.py (shared with the trainer);
``guarded_aligner`` (API key, TLS, mutual TLS to its teacher) is only for these tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fuseserve.teacher.hf_backend import HFBackend
from fuseserve.teacher.server import start_server
from fuseserve.teacher.settings import TeacherSettings
from tests.service_fixtures import aligner_settings, start_handle
from tests.teacher.tls import make_certs

ALIGNER_KEY = "aligner-key-0123"
TEACHER_KEY = "teacher-key-4567"


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secure_teacher(service_loop, tiny_dirs, certs):
    """An in-process teacher (tiny spm model) wanting mutual TLS and a bearer key."""
    tls = {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "tls_client_ca": certs.ca}
    limits = {"max_sequence_length": 1024, "max_k": 32, "batch_wait_ms": 2}
    settings = TeacherSettings(port=0, metrics_port=0, api_key=TEACHER_KEY, **tls, **limits)

    async def go():
        running = await start_server(settings)
        backend = HFBackend.load(str(tiny_dirs["spm"]), max_sequence_length=1024, max_k=32)
        await running.set_backend(backend)
        return running

    running = service_loop.run(go())
    yield running
    service_loop.run(running.stop(1.0))


@pytest.fixture(scope="module")
def guarded_aligner(service_loop, secure_teacher, certs, vocab_dir):
    """An aligner with an API key and TLS on gRPC, calling its teacher over mutual TLS with the
    teacher's key; REST bodies must arrive within 1 s."""
    serve = {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "api_key": ALIGNER_KEY}
    call = {f"teacher_tls_{k}": v for k, v in (("ca", certs.ca), ("cert", certs.client_cert))}
    call.update(teacher_tls_key=certs.client_key, teacher_api_key=TEACHER_KEY)
    teachers = {"spm": SimpleNamespace(port=secure_teacher.port)}
    settings = aligner_settings(teachers, vocab_dir, body_timeout_s=1.0, **serve, **call)
    handle = start_handle(service_loop, settings)
    yield handle
    handle.close()
