"""Every error class, through every transport of the aligner, answers the status its class says.

The classes are found by walking the hierarchy (``ServiceError`` and the pool's ``TeacherFault``,
subclasses included), not listed by hand, so a new class that ``EXPECTED`` does not know fails
here until its statuses are written down. The aligner's transports are real: uvicorn serving the
REST app with the vLLM-compatible routes, and the gRPC server, over a data plane that raises the
error (a teacher fault goes through ``faults.request_errors``, as in the real data plane). Each
status is checked against the number written here, not against the class attribute it comes
from.
"""

from __future__ import annotations

import asyncio
import types

import grpc
import httpx
import pytest
import uvicorn

import fuseserve.teacher.errors  # noqa: F401  (its classes join the walk)
from fuseserve.aligner.service.app import _bind
from fuseserve.aligner.service.faults import TeacherFault, TeacherOverloaded, request_errors
from fuseserve.aligner.service.grpc_api import AlignerServicer, start_grpc
from fuseserve.aligner.service.metrics import AlignerMetrics
from fuseserve.aligner.service.openai_api import add_openai_routes
from fuseserve.aligner.service.rest import create_app
from fuseserve.errors import InvalidRequest, Overloaded, ServiceError, UnknownModel
from fuseserve.wire.status import error_from_rpc
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc
from tests.teacher.conftest import LoopThread

# class name: (REST status, gRPC code, status of the vLLM-compatible route)
EXPECTED = {
    "ServiceError": (500, "INTERNAL", 500),
    "InvalidRequest": (422, "INVALID_ARGUMENT", 400),
    "PayloadTooLarge": (413, "INVALID_ARGUMENT", 413),
    "UnsupportedMediaType": (415, "INVALID_ARGUMENT", 415),
    "UnknownModel": (404, "NOT_FOUND", 404),
    "NotAcceptable": (406, "INVALID_ARGUMENT", 406),
    "Unauthorized": (401, "UNAUTHENTICATED", 401),
    "RequestTimeout": (408, "DEADLINE_EXCEEDED", 408),
    "Overloaded": (429, "RESOURCE_EXHAUSTED", 429),
    "Unavailable": (503, "UNAVAILABLE", 503),
    "TooManyConnections": (503, "UNAVAILABLE", 503),
    "DeadlineExceeded": (503, "DEADLINE_EXCEEDED", 503),
    "EngineUnavailable": (503, "UNAVAILABLE", 503),
    # the pool's teacher faults, as the request errors they become
    "TeacherFault": (503, "UNAVAILABLE", 503),
    "TeacherUnavailable": (503, "UNAVAILABLE", 503),
    "TeacherOverloaded": (429, "RESOURCE_EXHAUSTED", 429),
    "UnknownTeacher": (422, "INVALID_ARGUMENT", 400),
    "TeacherRejected": (422, "INVALID_ARGUMENT", 400),
    "MapMissing": (422, "INVALID_ARGUMENT", 400),
}
OPENAI_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}
OPENAI_TYPES.update({429: "RateLimitError", 503: "ServiceUnavailableError"})


def walk(root: type) -> list[type]:
    """``root`` and every subclass of it that fuseserve defines."""
    found = [root]
    for sub in root.__subclasses__():
        found += [cls for cls in walk(sub) if cls.__module__.startswith("fuseserve.")]
    return found


CLASSES = walk(ServiceError) + walk(TeacherFault)


def sample(cls: type) -> Exception:
    """An instance of ``cls``, its field named as the ids path names one; an overload says
    2.5 s (Retry-After: 3)."""
    if issubclass(cls, TeacherFault):
        error = cls("spm", "teacher 'spm': something about it")
    elif issubclass(cls, UnknownModel):
        error = cls("gpt-x")
    elif issubclass(cls, InvalidRequest):
        error = cls("token_ids[0][3]", "is not a good id")
    else:
        error = cls("something is wrong")
    if isinstance(error, Overloaded | TeacherOverloaded):
        error.retry_after_s = 2.5
    return error


def as_request_error(error: Exception) -> ServiceError:
    """What the data plane raises for ``error`` (a teacher fault: the request error it means)."""
    try:
        with request_errors():
            raise error
    except ServiceError as exc:
        return exc
    raise AssertionError("unreachable")


class FailingService:
    """Stands in for the aligner's data plane: every query raises ``error``."""

    def __init__(self) -> None:
        self.error: Exception = ServiceError("unset")
        self.target = types.SimpleNamespace(fingerprint="f" * 32, vocab_size=10)
        self.settings = types.SimpleNamespace(max_block_tokens=64, max_texts=4, k=2, max_prompts=8)

    def refusal_before_parsing(self, every_teacher: bool = False):
        return None

    async def answer(self, call, transport, streamed=False):
        return (await self.answer_all([call], transport, streamed))[0]

    async def answer_all(self, calls, transport, streamed=False):
        with request_errors():
            raise self.error


@pytest.fixture(scope="module")
def servers():
    loop = LoopThread()
    service, metrics = FailingService(), AlignerMetrics()
    servicer = AlignerServicer(service, metrics, "target")  # type: ignore[arg-type]
    grpc_server, grpc_port, _ = loop.run(start_grpc(servicer, "127.0.0.1", 0, 1 << 20))
    app = create_app(service, metrics, "target")  # type: ignore[arg-type]
    add_openai_routes(app, service, metrics, "fuseserve/target", None)  # type: ignore[arg-type]
    rest = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    sock = _bind("127.0.0.1", 0)
    serving = loop.run(_start(rest, sock))
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    http = httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30)
    yield types.SimpleNamespace(
        service=service, stub=aligner_pb2_grpc.AlignerStub(channel), http=http
    )
    http.close()
    channel.close()
    rest.should_exit = True
    loop.run(asyncio.wait_for(serving, 30))
    loop.run(grpc_server.stop(0))
    loop.close()


async def _start(server: uvicorn.Server, sock) -> asyncio.Future:
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return task


def test_every_error_class_is_expected():
    names = {cls.__name__ for cls in CLASSES}
    assert names == set(EXPECTED), "write the statuses of a new error class into EXPECTED"


@pytest.mark.parametrize("cls", CLASSES, ids=[cls.__name__ for cls in CLASSES])
def test_every_error_class_has_its_status_on_every_transport(servers, cls):
    rest_status, grpc_code, openai_status = EXPECTED[cls.__name__]
    servers.service.error = error = sample(cls)
    meant = as_request_error(error)
    check_rest(servers.http.post("/v1/fuse", json={"text": "x"}), rest_status, meant)
    for name, call in (
        ("Fuse", lambda: servers.stub.Fuse(aligner_pb2.FuseRequest(id="r1", texts=["x"]))),
        ("FuseStream", lambda: list(servers.stub.FuseStream(iter([fuse_request()])))),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        check_grpc(err.value, grpc_code, meant, name)
    body = {"prompt": [1, 2, 3], "prompt_logprobs": 1}
    check_openai(servers.http.post("/v1/completions", json=body), openai_status, meant)


def fuse_request() -> aligner_pb2.FuseRequest:
    return aligner_pb2.FuseRequest(id="r1", texts=["x"])


def check_rest(response: httpx.Response, status: int, meant: ServiceError) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type(meant).__name__ and error["message"] == str(meant)
    assert error.get("field") == meant.field
    assert response.headers.get("retry-after") == retry_after(status, meant)
    assert (response.headers.get("www-authenticate") == "Bearer") == (status == 401)


def check_grpc(err: grpc.RpcError, code: str, meant: ServiceError, name: str) -> None:
    assert err.code().name == code, name
    prefix = "request 'r1': " if name == "FuseStream" else ""
    assert err.details() == prefix + str(meant), name
    metadata = dict(err.trailing_metadata() or ())
    assert metadata.get("fuseserve-field") == meant.field, name
    status = 429 if code == "RESOURCE_EXHAUSTED" else 0
    assert metadata.get("retry-after") == retry_after(status, meant), name
    back = error_from_rpc(err)
    assert back.remote_status == code, name
    assert meant.field is None or back.field == meant.field, name


def check_openai(response: httpx.Response, status: int, meant: ServiceError) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    default = "BadRequestError" if status < 500 else "InternalServerError"
    assert error["type"] == OPENAI_TYPES.get(status, default)
    param = None if meant.field is None else meant.field.replace("token_ids[0]", "prompt")
    assert error["param"] == param
    assert response.headers.get("retry-after") == retry_after(status, meant)


def retry_after(status: int, meant: ServiceError) -> str | None:
    """Every overload says 2.5 s; other errors only what their class says (a connection cap:
    1 s)."""
    return "3" if status == 429 else meant.retry_after()
