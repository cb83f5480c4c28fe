"""Services that cannot start say so in one line and exit 1: no traceback, no shutdown noise."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from fuseserve import launch

pytestmark = pytest.mark.slow


def run(*args, **env):
    if args[0] == "teacher":
        args = (*args, "--metrics-port", "0")
    return subprocess.run(
        launch.fuseserve_cmd(*args),
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


def assert_one_clear_line(result, *needles):
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert "Event loop is closed" not in result.stderr
    assert "Exception ignored" not in result.stderr


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_teacher_with_a_missing_model(tmp_path):
    result = run("teacher", "--model", str(tmp_path / "no-model"), "--port", "0")
    assert_one_clear_line(result, "model: cannot load", "no-model", "no such file or directory")
    debug = run(
        "teacher", "--model", str(tmp_path / "no-model"), "--port", "0", FUSESERVE_DEBUG="1"
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_teacher_on_a_port_in_use_or_with_unreadable_tls_files(busy_port, tmp_path):
    result = run("teacher", "--port", str(busy_port))
    assert_one_clear_line(result, f"port: cannot listen on 127.0.0.1:{busy_port}", "in use")
    result = run(
        "teacher",
        "--port",
        "0",
        "--tls-cert",
        str(tmp_path / "cert.pem"),
        "--tls-key",
        str(tmp_path / "key.pem"),
    )
    assert_one_clear_line(result, "tls_key: cannot read", "key.pem")


def test_aligner_on_a_port_in_use_or_with_a_bad_tokenizer(busy_port, tmp_path):
    teacher = ("--teacher", "a=127.0.0.1:1")
    result = run("aligner", *teacher, "--rest-port", str(busy_port), "--grpc-port", "0")
    assert_one_clear_line(result, "rest_port: cannot listen", "in use")
    result = run("aligner", *teacher, "--rest-port", "0", "--grpc-port", str(busy_port))
    assert_one_clear_line(result, "grpc_port: cannot listen", "in use")
    result = run("aligner", *teacher, "--target-tokenizer", str(tmp_path / "missing-tokenizer"))
    assert_one_clear_line(result, "target_tokenizer: cannot load", "missing-tokenizer")
