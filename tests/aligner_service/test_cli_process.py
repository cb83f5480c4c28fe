"""`fuseserve aligner` as a real process: YAML config + environment, both ports, SIGTERM."""

from __future__ import annotations

import subprocess

import httpx
import pytest
import yaml

from fuseserve import launch

pytestmark = pytest.mark.slow


def test_aligner_process_from_yaml_and_env(teacher_procs, tmp_path, logs, vocab_dir):
    config = tmp_path / "aligner.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "teachers": [
                    {"name": name, "addresses": [f"127.0.0.1:{proc.port}"]}
                    for name, proc in teacher_procs.items()
                ],
                "k": 4,
                "vocab_map_dir": str(vocab_dir),
            }
        )
    )
    proc = launch.start_aligner(
        {},
        logs,
        extra=["--config", str(config)],
        env={"FUSESERVE_ALIGNER_K": "6"},  # the environment wins over the file
    )
    try:
        launch.wait_grpc_serving(proc, 240)
        with httpx.Client(base_url=f"http://127.0.0.1:{proc.rest_port}", timeout=60) as rest:
            assert rest.get("/readyz").status_code == 200
            fused = rest.post("/v1/fuse", json={"text": "From a process, configured by YAML."})
            assert fused.status_code == 200 and fused.json()["k"] == 6
            assert "fuseserve_aligner_requests_total" in rest.get("/metrics").text
        assert proc.stop(30) == 0
    finally:
        proc.stop()


def test_aligner_cli_rejects_bad_settings_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teachers:\n  - name: a\n    addresses: ['127.0.0.1:1']\nk: 0\n")
    run = subprocess.run(
        launch.fuseserve_cmd("aligner", "--config", str(bad)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "k" in run.stderr and "greater than or equal" in run.stderr
    run = subprocess.run(
        launch.fuseserve_cmd("aligner", "--teacher", "a=127.0.0.1:1", "--options", '{"nope": 1}'),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "nope" in run.stderr
