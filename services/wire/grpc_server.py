"""Every fuseserve gRPC server: one way to start one, and what guards it.

Covers ``start_server`` (the one start-up both the teacher and the aligner use: a ``grpc.aio``
server with explicit message-size limits, the bearer-key and error-status interceptors, the
service registered behind the payload guard, ``grpc.health.v1`` and reflection, the port bound,
TLS), the settings every server shares (``ServerSecurity``), the payload guard (a request that
does not parse, bytes that are not the message or invalid UTF-8 in a string field, is answered
INVALID_ARGUMENT instead of UNKNOWN, and one larger than ``max_message_bytes`` INVALID_ARGUMENT
naming that limit, not RESOURCE_EXHAUSTED, which callers retry although it can never succeed:
the server reads messages up to twice its limit so that it can say so), a server interceptor
that wants ``authorization: Bearer <key>`` on every method except ``grpc.health.v1`` (probes carry
no secrets; constant-time comparison, like REST), TLS on the server (certificate + key, and a
client CA for mutual TLS), binding the port, and ``Health`` (NOT_SERVING until told otherwise,
for the whole server and the named service).

Leaves out: channels (``grpc_channel``), the error -> status mapping (``status``) and the
services themselves (teacher, aligner).
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, Field, SecretStr

from fuseserve.errors import (
    InvalidRequest,
    PayloadTooLarge,
    ServiceError,
    StartupError,
    Unauthorized,
)
from fuseserve.wire.grpc_channel import read_pem
from fuseserve.wire.status import ErrorStatus, abort_with

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class ServerSecurity(BaseModel):
    """The key and TLS settings every fuseserve server shares (teacher, aligner)."""

    api_key: SecretStr | None = Field(
        None,
        description="bearer token every call needs except health checks (header or gRPC "
        "metadata 'authorization: Bearer <key>')",
    )
    tls_cert: str | None = Field(None, description="PEM certificate: serve gRPC over TLS")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: str | None = Field(
        None, description="PEM CA: gRPC clients must present a certificate it signed (mTLS)"
    )

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        return server_credentials(self.tls_cert, self.tls_key, self.tls_client_ca)

    def key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None


@dataclass(frozen=True)
class _Malformed:
    error: ServiceError


def _safe(
    deserializer: Callable[[bytes], object], max_bytes: int | None
) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        if max_bytes is not None and len(data) > max_bytes:
            return _Malformed(
                PayloadTooLarge(
                    "request",
                    f"{len(data)} bytes exceed the server's max_message_bytes={max_bytes}; "
                    "send fewer or shorter texts per request",
                )
            )
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            why = str(exc) or type(exc).__name__
            return _Malformed(InvalidRequest("request", f"not a valid message ({why})"))

    return parse


async def _reject(context, request: _Malformed) -> None:
    await abort_with(context, request.error)


def _guard_handler(handler: grpc.RpcMethodHandler, max_bytes: int | None) -> grpc.RpcMethodHandler:
    if handler.request_deserializer is None:
        return handler
    parse = _safe(handler.request_deserializer, max_bytes)
    if not handler.request_streaming:
        inner = handler.unary_unary or handler.unary_stream
        if handler.response_streaming:

            async def unary_stream(request, context):
                if isinstance(request, _Malformed):
                    await _reject(context, request)
                async for reply in inner(request, context):
                    yield reply

            return handler._replace(request_deserializer=parse, unary_stream=unary_stream)

        async def unary_unary(request, context):
            if isinstance(request, _Malformed):
                await _reject(context, request)
            return await inner(request, context)

        return handler._replace(request_deserializer=parse, unary_unary=unary_unary)

    def checked(requests, context):
        async def gen():
            async for request in requests:
                if isinstance(request, _Malformed):
                    await _reject(context, request)
                yield request

        return gen()

    if handler.response_streaming:
        inner_ss = handler.stream_stream

        async def stream_stream(requests, context):
            async for reply in inner_ss(checked(requests, context), context):
                yield reply

        return handler._replace(request_deserializer=parse, stream_stream=stream_stream)
    inner_su = handler.stream_unary

    async def stream_unary(requests, context):
        return await inner_su(checked(requests, context), context)

    return handler._replace(request_deserializer=parse, stream_unary=stream_unary)


class _Capture:
    """Stands in for the server while a generated ``add_*Servicer_to_server`` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self.handlers[service] = dict(handlers)


def add_guarded(
    add_servicer: Callable, servicer, server: grpc.aio.Server, max_message_bytes: int | None
) -> None:
    """``add_XServicer_to_server(servicer, server)`` with malformed requests and requests over
    ``max_message_bytes`` (None: no check here) -> INVALID_ARGUMENT."""
    capture = _Capture()
    add_servicer(servicer, capture)
    for service, handlers in capture.handlers.items():
        guarded = {name: _guard_handler(h, max_message_bytes) for name, h in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        server.add_registered_method_handlers(service, guarded)


class TokenAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <key>``; health stays open."""

    def __init__(self, key: str) -> None:
        self.expected = key.encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_SERVICES):
            return await continuation(details)
        given = ""
        for name, value in details.invocation_metadata or ():
            if name == "authorization":
                given = value if isinstance(value, str) else value.decode(errors="replace")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self.expected)
        if ok:
            return await continuation(details)
        handler = await continuation(details)
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def abort(request_or_iterator, context):
        message = "a valid API key is required: metadata 'authorization: Bearer <key>'"
        await abort_with(context, Unauthorized(message))

    async def abort_stream(request_or_iterator, context):
        await abort(request_or_iterator, context)
        yield None  # never reached

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort)
    kinds = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kinds]
    return make(abort_stream if kinds[1] else abort)


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None = None
) -> grpc.ServerCredentials | None:
    """TLS for a server (None: plaintext). ``client_ca`` set: clients must present a
    certificate signed by it (mutual TLS)."""
    if not cert and not key:
        if client_ca:
            raise StartupError("tls_client_ca: needs tls_cert and tls_key (mutual TLS)")
        return None
    if not (cert and key):
        raise StartupError("tls_cert/tls_key: give both the certificate and its key")
    pair = (read_pem(key, "tls_key"), read_pem(cert, "tls_cert"))
    ca = read_pem(client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def add_port(server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``address`` (TLS when credentials are given); a port that cannot be bound is a
    StartupError naming it."""
    host, _, port = address.rpartition(":")
    if port.isdigit() and int(port):
        try:  # a plain bind first: gRPC's own failure is a log line from C and a vague error
            family, kind, _, _, where = socket.getaddrinfo(
                host.strip("[]") or None, int(port), type=socket.SOCK_STREAM
            )[0]
            with socket.socket(family, kind) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(where)
        except OSError as exc:
            raise StartupError(f"port: cannot listen on {address}: {exc.strerror or exc}") from None
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(
            f"port: cannot listen on {address} (in use, or not an address of this host): {exc}"
        ) from None


class Health:
    """grpc.health.v1 status of the server ("") and of one named service, set together."""

    def __init__(self, servicer: health.aio.HealthServicer, service_name: str) -> None:
        self.servicer = servicer
        self.service_name = service_name

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", self.service_name):
            await self.servicer.set(name, status)


def receive_ceiling(max_message_bytes: int) -> int:
    """What a server's gRPC core accepts before refusing a message on its own: twice the limit,
    so that a request between the two is read and answered INVALID_ARGUMENT naming
    ``max_message_bytes`` (the core would answer RESOURCE_EXHAUSTED, which callers retry)."""
    return 2 * max_message_bytes


def new_server(max_message_bytes: int, interceptors=None) -> grpc.aio.Server:
    """A server that sends at most ``max_message_bytes`` per message and reads up to
    ``receive_ceiling``; register its services with ``add_guarded`` and the same
    limit, which refuses requests over it."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", receive_ceiling(max_message_bytes)),
    ]
    return grpc.aio.server(options=options, interceptors=interceptors)


async def add_health_and_reflection(server: grpc.aio.Server, service_name: str) -> Health:
    """Health (NOT_SERVING) and reflection for ``service_name``; call before ``server.start``."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    state = Health(servicer, service_name)
    await state.set_serving(False)
    return state


@dataclass
class RunningServer:
    """A started gRPC server: the port it listens on and its health status (NOT_SERVING)."""

    server: grpc.aio.Server
    port: int
    health: Health


async def start_server(
    service_name: str,
    add_servicer: Callable,
    servicer,
    address: str,
    max_message_bytes: int,
    api_key: str | None = None,
    credentials: grpc.ServerCredentials | None = None,
    on_error: Callable[[ServiceError], None] | None = None,
) -> RunningServer:
    """Serve ``servicer`` (registered by its generated ``add_XServicer_to_server``) on
    ``address``: every call but health needs ``api_key`` (None: none), ``credentials``: TLS,
    every ``ServiceError`` a handler raises answered with its status (``on_error`` sees each
    first: metrics), requests over ``max_message_bytes`` refused by name. Health NOT_SERVING until
    ``Health.set_serving``; a port that cannot be bound is a ``StartupError`` naming it."""
    errors = ErrorStatus(on_error)
    server = new_server(max_message_bytes, [TokenAuth(api_key), errors] if api_key else [errors])
    add_guarded(add_servicer, servicer, server, max_message_bytes)
    health_state = await add_health_and_reflection(server, service_name)
    try:
        port = add_port(server, address, credentials)
    except StartupError:
        await server.stop(None)
        raise
    await server.start()
    return RunningServer(server, port, health_state)
