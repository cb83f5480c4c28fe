"""What guards every fuseserve gRPC server and channel: malformed payloads, a bearer token, TLS.

Covers registering a service so that a request that does not parse (bytes that are not the
message, invalid UTF-8 in a string field) is answered INVALID_ARGUMENT instead of UNKNOWN, and a
request larger than the server's ``max_message_bytes`` is answered INVALID_ARGUMENT naming that
limit (not RESOURCE_EXHAUSTED, which callers retry although it can never succeed); a
server interceptor that wants ``authorization: Bearer <key>`` on every method except
``grpc.health.v1`` (probes carry no secrets) and answers UNAUTHENTICATED otherwise (constant-time
comparison, like REST); TLS on the server (certificate + key, and a client CA for mutual TLS) and
on channels (a CA bundle to trust, a client certificate + key for mutual TLS); and the call
metadata that carries a key.

Leaves out: the services themselves, and where the settings come from (each service's settings).
"""

from __future__ import annotations

import hmac
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import BaseModel, Field, SecretStr

from fuseserve.errors import (
    InvalidRequest,
    PayloadTooLarge,
    ServiceError,
    StartupError,
    Unauthorized,
)
from fuseserve.wire.status import abort_with

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


def auth_metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying ``key`` (None: no metadata)."""
    return (("authorization", f"Bearer {key}"),) if key else None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


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
    pair = (_read(key, "tls_key"), _read(cert, "tls_cert"))
    ca = _read(client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def channel_credentials(
    ca: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials | None:
    """TLS for a channel (None: plaintext): trust ``ca`` (a file; "system" trusts the system's
    roots); ``cert`` + ``key``: the client certificate for mutual TLS."""
    if not ca:
        if cert or key:
            raise StartupError("a client certificate needs TLS: set the CA to trust as well")
        return None
    if bool(cert) != bool(key):
        raise StartupError("client tls cert/key: give both the certificate and its key")
    roots = None if ca == "system" else _read(ca, "tls_ca")
    return grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=_read(key, "tls client key"),
        certificate_chain=_read(cert, "tls client cert"),
    )


CLIENT_ENV = "FUSESERVE_CLIENT_"


def client_security_from_env(environ=None) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """(TLS credentials, API key) for a client configured only by its environment (the trainer's
    Ray workers): ``FUSESERVE_CLIENT_TLS_CA`` / ``_TLS_CERT`` / ``_TLS_KEY`` and
    ``FUSESERVE_CLIENT_API_KEY``; unset: plaintext, no key."""
    env = os.environ if environ is None else environ
    credentials = channel_credentials(
        env.get(CLIENT_ENV + "TLS_CA"),
        env.get(CLIENT_ENV + "TLS_CERT"),
        env.get(CLIENT_ENV + "TLS_KEY"),
    )
    return credentials, env.get(CLIENT_ENV + "API_KEY") or None


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


def aio_channel(
    address: str, credentials: grpc.ChannelCredentials | None, options
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


def sync_channel(address: str, credentials: grpc.ChannelCredentials | None, options=None):
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
