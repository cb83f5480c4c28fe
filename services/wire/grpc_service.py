"""What every fuseserve gRPC endpoint shares: message-size limits, health, reflection, channels.

Covers building a ``grpc.aio`` server with explicit message-size limits (it reads messages up to
twice its limit so that the guard can refuse an oversize request as the caller's mistake), adding
``grpc.health.v1`` and server reflection for one service (``Health``: NOT_SERVING until told
otherwise, for the whole server and the named service), and client channel options: the same
limits, quick reconnects after a peer restarts (gRPC's default backoff reaches 120 s), and
round-robin over every address a ``dns:///`` name resolves to (a headless Kubernetes Service).

Leaves out: the services themselves (teacher, aligner).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


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
    ``receive_ceiling``; register its services with ``grpc_guard.add_guarded`` and the same
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
