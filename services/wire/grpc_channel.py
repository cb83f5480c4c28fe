"""Every fuseserve gRPC channel: message-size limits, reconnects, TLS, the bearer key, health.

Covers the channel options (the same message-size limits as the servers, quick reconnects after a
peer restarts: gRPC's default backoff reaches 120 s, and round-robin over every address a
``dns:///`` name resolves to, a headless Kubernetes Service), TLS for a channel (a CA bundle to
trust, a client certificate + key for mutual TLS), a client configured only by its environment
(``FUSESERVE_CLIENT_*``), the call metadata that carries a key, opening a channel (asyncio or
blocking) and asking a server's ``grpc.health.v1`` status.

Leaves out: servers (``grpc_server``) and the services' own stubs.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuseserve.errors import StartupError


def size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        *size_options(max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.lb_policy_name", "round_robin"),
    ]


def auth_metadata(key: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying ``key`` (None: no metadata)."""
    return (("authorization", f"Bearer {key}"),) if key else None


def read_pem(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


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
    roots = None if ca == "system" else read_pem(ca, "tls_ca")
    return grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=read_pem(key, "tls client key"),
        certificate_chain=read_pem(cert, "tls client cert"),
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


def health_status(address: str, timeout_s: float = 1.0, credentials=None) -> str:
    """The grpc.health.v1 status of the server at ``address`` ("SERVING", ..., or the error);
    ``credentials``: TLS channel credentials (None: plaintext)."""
    try:
        with (
            grpc.secure_channel(address, credentials)
            if credentials is not None
            else grpc.insecure_channel(address)
        ) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
