"""One status per error class on every gRPC service, and the client's way back to the class.

The teacher and the aligner servers are real (port 0, no model, no teachers); a handler is made
to raise each error class, including subclasses the table does not list.
"""

from __future__ import annotations

import types

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseserve.aligner.service.grpc_api import AlignerServicer, start_grpc
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.errors import DeadlineExceeded, InvalidRequest, Overloaded, ServiceError, Unavailable
from fuseserve.teacher.errors import EngineUnavailable
from fuseserve.teacher.server import start_server
from fuseserve.teacher.settings import TeacherSettings
from fuseserve.wire.status import error_from_rpc
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc, teacher_pb2, teacher_pb2_grpc
from tests.teacher.conftest import LoopThread


class Throttled(Overloaded):
    """A subclass the status table does not list."""


class Odd(ServiceError):
    """A ServiceError outside every listed class."""


Code = grpc.StatusCode
CASES = [
    (InvalidRequest("texts[2]", "is empty"), Code.INVALID_ARGUMENT, InvalidRequest),
    (Overloaded("busy", retry_after_s=2.5), Code.RESOURCE_EXHAUSTED, Overloaded),
    (Throttled("slow down"), Code.RESOURCE_EXHAUSTED, Overloaded),
    (Unavailable("teacher 'x' is down"), Code.UNAVAILABLE, Unavailable),
    (EngineUnavailable("model is still loading"), Code.UNAVAILABLE, Unavailable),
    (DeadlineExceeded("too slow"), Code.DEADLINE_EXCEEDED, DeadlineExceeded),
    (Odd("something else"), Code.INTERNAL, ServiceError),
    (ServiceError("plain"), Code.INTERNAL, ServiceError),
]
IDS = [type(case[0]).__name__ for case in CASES]


class FailingService:
    """Stands in for the aligner's data plane: every call raises ``error``."""

    def __init__(self) -> None:
        self.error: ServiceError = ServiceError("unset")
        self.target = types.SimpleNamespace(fingerprint="f" * 32, vocab_size=10)

    async def answer(self, *args, **kwargs):
        raise self.error


@pytest.fixture(scope="module")
def servers():
    loop = LoopThread()
    teacher = loop.run(start_server(TeacherSettings(port=0, metrics_port=0)))
    service = FailingService()
    servicer = AlignerServicer(service, AlignerMetrics(), "target")  # type: ignore[arg-type]
    aligner, port, _ = loop.run(start_grpc(servicer, "127.0.0.1", 0, 1 << 20))
    teacher_channel = grpc.insecure_channel(f"127.0.0.1:{teacher.port}")
    aligner_channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield types.SimpleNamespace(
        teacher=teacher,
        service=service,
        metrics=servicer.metrics,
        teacher_stub=teacher_pb2_grpc.TeacherStub(teacher_channel),
        aligner_stub=aligner_pb2_grpc.AlignerStub(aligner_channel),
        channels={"teacher": teacher_channel, "aligner": aligner_channel},
    )
    teacher_channel.close()
    aligner_channel.close()
    loop.run(teacher.stop(0))
    loop.run(aligner.stop(0))
    loop.close()


def calls(servers, error: ServiceError):
    """(name, call, the details expected) for every kind of handler of both services."""

    def raise_error():
        raise error

    servers.teacher.servicer._ready = raise_error
    servers.service.error = error
    teacher, aligner = servers.teacher_stub, servers.aligner_stub
    score = teacher_pb2.ScoreRequest(texts=["x"], k=1)
    fuse = aligner_pb2.FuseRequest(id="r1", texts=["x"])
    return [
        ("teacher Info (unary)", lambda: teacher.Info(teacher_pb2.InfoRequest(), timeout=10), ""),
        ("teacher Score (stream)", lambda: list(teacher.Score(score, timeout=10)), ""),
        ("aligner Fuse (unary)", lambda: aligner.Fuse(fuse, timeout=10), ""),
        (
            "aligner FuseStream (stream)",
            lambda: list(aligner.FuseStream(iter([fuse]), timeout=10)),
            "request 'r1': ",
        ),
    ]


@pytest.mark.parametrize(("error", "code", "translated"), CASES, ids=IDS)
def test_every_service_gives_an_error_class_the_same_status(servers, error, code, translated):
    for name, call, prefix in calls(servers, error):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, name
        assert err.value.details() == prefix + str(error), name
        back = error_from_rpc(err.value)
        assert type(back) is translated, name
        assert str(back) == err.value.details() and back.remote_status == code.name, name
        if isinstance(error, InvalidRequest):
            assert back.field == error.field, name
        if isinstance(error, Overloaded):
            assert back.retry_after_s == max(1, round(error.retry_after_s + 0.49)), name


class Counted(Unavailable):
    """Raised only by the counting test."""


def test_errors_are_counted_by_class_on_both_services(servers):
    error = Counted("counted")
    for _, call, _ in calls(servers, error):
        with pytest.raises(grpc.RpcError):
            call()
    aligner = servers.metrics.registry.get_sample_value(
        "fuseserve_aligner_requests_total", {"transport": "grpc", "outcome": "Counted"}
    )
    teacher = servers.teacher.metrics.registry.get_sample_value(
        "fuseserve_teacher_failures_total", {"kind": "Counted"}
    )
    assert aligner == 2
    assert teacher == 2


def test_a_shared_error_keeps_its_message_when_a_stream_names_its_request():
    error = InvalidRequest("k", "must be >= 1")
    named = error.prefixed("request 'a': ")
    assert str(named) == "request 'a': k: must be >= 1" and named.field == "k"
    assert str(error) == "k: must be >= 1"


@pytest.mark.parametrize("server", ["teacher", "aligner"])
def test_a_handler_that_writes_its_replies_passes_the_interceptor(servers, server):
    """grpc.health.v1 Watch writes its replies with ``context.write`` (a coroutine, not an
    async generator); through the interceptor it still streams its first status."""
    stub = health_pb2_grpc.HealthStub(servers.channels[server])
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    first = next(iter(watch))
    watch.cancel()
    assert first.status in (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
