"""Start fuseserve services (and redis-server) as local processes and wait until they are ready.

Covers what the demo, the benchmarks and the tests share: free ports, one process per service with
its log in a file, readiness by gRPC health (teachers, aligner) or a Redis PING, stopping with
SIGTERM then SIGKILL, and a clear error with the log's tail when a process dies while starting.

Ships with the package (not only in tests/): ``fuseserve demo`` and ``fuseserve experiment`` start
their teachers, aligner and Redis with it at run time.

Leaves out: what the services do; Docker and Kubernetes (see docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ProcessDied(RuntimeError):
    """A service process exited while we waited for it."""


@dataclass
class ServiceProcess:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen
    port: int
    rest_port: int | None = None  # the aligner's REST port (set by ``start_aligner``)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ProcessDied(
                f"{self.name} exited with code {self.popen.returncode} while starting; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def stop(self, grace_s: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def kill(self) -> None:
        self.stop(0.0, signal.SIGKILL)


def spawn(
    name: str, args: list[str], port: int, log_dir: str | os.PathLike[str], env=None
) -> ServiceProcess:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    popen = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    log.close()
    return ServiceProcess(name, args, log_path, popen, port)


def fuseserve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fuseserve.cli", *args]


def start_teacher(
    name: str, model: str, log_dir, port: int | None = None, extra: list[str] | None = None
) -> ServiceProcess:
    port = port or free_port()
    args = fuseserve_cmd(
        "teacher", "--model", model, "--port", str(port), "--metrics-port", "0", *(extra or [])
    )
    return spawn(f"teacher-{name}", args, port, log_dir)


def start_aligner(
    teachers: dict[str, list[str]],
    log_dir,
    grpc_port: int | None = None,
    rest_port: int | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    grpc_port = grpc_port or free_port()
    rest_port = rest_port or free_port()
    args = fuseserve_cmd("aligner", "--grpc-port", str(grpc_port), "--rest-port", str(rest_port))
    for name, addresses in teachers.items():
        args += ["--teacher", f"{name}={','.join(addresses)}"]
    proc = spawn("aligner", args + list(extra or []), grpc_port, log_dir, env)
    proc.rest_port = rest_port
    return proc


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.05, alive=None):
    """Poll ``condition()`` until it is truthy (returned) or ``timeout_s`` passes (TimeoutError
    naming ``what``); ``alive()`` is called first each round and may raise (a dead process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if alive is not None:
            alive()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def wait_grpc_serving(proc: ServiceProcess, timeout_s: float, host: str = "127.0.0.1") -> None:
    """Wait for grpc.health.v1 SERVING; raise ProcessDied or TimeoutError with the log tail."""
    from fuseserve.wire.grpc_channel import health_status

    address = f"{host}:{proc.port}"
    try:
        wait_until(
            lambda: health_status(address) == "SERVING",
            timeout_s,
            f"{proc.name} to be SERVING",
            interval_s=0.2,
            alive=proc.check_alive,
        )
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; log tail:\n{proc.log_tail()}") from None


def redis_server_path() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def start_redis(
    log_dir,
    port: int | None = None,
    maxmemory: str = "256mb",
    timeout_s: float = 120.0,
    data_dir: str | os.PathLike[str] | None = None,
) -> ServiceProcess:
    """A local redis-server (allkeys-lru), ready to use on return: throwaway, or, with
    ``data_dir``, saved there (a snapshot every minute with changes, and on SIGTERM) and loaded
    again by the next one started on the same folder."""
    binary = redis_server_path()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    if data_dir is None:
        persistence = ["--save", ""]
    else:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        persistence = ["--dir", str(Path(data_dir).absolute()), "--save", "60 1"]
    args = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        *persistence,
        "--appendonly", "no",
        "--maxmemory", maxmemory,
        "--maxmemory-policy", "allkeys-lru",
    ]  # fmt: skip
    proc = spawn(f"redis-{port}", args, port, log_dir)

    def pong() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    try:
        wait_until(pong, timeout_s, f"redis-server on {port}", alive=proc.check_alive)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}:\n{proc.log_tail()}") from None
    return proc
