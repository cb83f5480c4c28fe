"""Shared service fixtures (a pytest plugin loaded by tests/conftest.py).

Real processes on loopback: tiny teachers of two tokenizer families, redis-server, the aligner.

Teachers: tiny Llama models built from real tokenizers, fixed seed: ``spm`` (Mistral v1
SentencePiece) and ``bpe`` (SmolLM2 byte-level BPE), each a ``fuseserve teacher`` process. The
target tokenizer is Mistral v1. The aligner runs in this process (an event loop in a thread) so
tests can look inside; ``test_cli_process`` runs it as a process too.
"""

from __future__ import annotations

import httpx
import pytest

from fuseserve import launch
from fuseserve.aligner.service.app import start_aligner
from fuseserve.aligner.service.settings import load_settings, parse_teacher_flag
from fuseserve.teacher.tiny import save_tiny_llama
from tests.teacher.conftest import LoopThread


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, mistral_tok, smol_tok, bert_tok):
    root = tmp_path_factory.mktemp("tiny-teachers")
    return {
        "spm": save_tiny_llama(mistral_tok, root / "spm", seed=1),
        "bpe": save_tiny_llama(smol_tok, root / "bpe", seed=2),
        "wp": save_tiny_llama(bert_tok, root / "wp", seed=3),
    }


@pytest.fixture(scope="session")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("service-logs")


TEACHER_ARGS = ["--max-sequence-length", "1024", "--max-k", "32", "--batch-wait-ms", "2"]


def start_teacher(name, model_dir, logs, port=None):
    proc = launch.start_teacher(name, str(model_dir), logs, port=port, extra=TEACHER_ARGS)
    return proc


@pytest.fixture(scope="session")
def teacher_procs(tiny_dirs, logs):
    procs = {name: start_teacher(name, tiny_dirs[name], logs) for name in ("spm", "bpe")}
    try:
        for proc in procs.values():
            launch.wait_grpc_serving(proc, 180)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="session")
def redis_proc(logs):
    proc = launch.start_redis(logs)
    yield proc
    proc.stop()


def aligner_settings(teacher_procs, tmp_dir, **overrides):
    teachers = [
        parse_teacher_flag(f"{name}=127.0.0.1:{proc.port}") for name, proc in teacher_procs.items()
    ]
    values = dict(
        teachers=teachers,
        rest_port=0,
        grpc_port=0,
        vocab_map_dir=str(tmp_dir),
        teacher_timeout_s=60,
        teacher_retries=1,
        teacher_backoff_s=0.05,
        info_refresh_s=0,
        startup_timeout_s=180,
        redis_retry_s=0.3,
        log_level="warning",
        preset="default",  # the tests compare with FusionOptions(); tests of spans ask for it
    )
    values.update(overrides)
    return load_settings(**values)


class AlignerHandle:
    """An in-process aligner plus sync clients for both transports."""

    def __init__(self, loop: LoopThread, running) -> None:
        self.loop = loop
        self.running = running
        self.rest = httpx.Client(base_url=f"http://127.0.0.1:{running.rest_port}", timeout=120)
        self.grpc_address = f"127.0.0.1:{running.grpc_port}"

    @property
    def service(self):
        return self.running.service

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.running.metrics.registry.get_sample_value(name, labels or {})
        return value or 0.0

    def close(self) -> None:
        self.rest.close()
        self.loop.run(self.running.stop(1.0))


def start_handle(loop: LoopThread, settings) -> AlignerHandle:
    async def go():
        running = await start_aligner(settings)
        await running.wait_ready(240)
        return running

    return AlignerHandle(loop, loop.run(go(), timeout=300))


@pytest.fixture(scope="session")
def service_loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vocab-maps")


@pytest.fixture(scope="session")
def aligner(service_loop, teacher_procs, redis_proc, vocab_dir):
    """The aligner on Redis (REDIS_URL path), teachers spm + bpe, target Mistral v1."""
    settings = aligner_settings(
        teacher_procs, vocab_dir, redis_url=f"redis://127.0.0.1:{redis_proc.port}/0"
    )
    handle = start_handle(service_loop, settings)
    yield handle
    handle.close()
