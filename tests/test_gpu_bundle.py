"""The GPU check's bundle (scripts/gpu_bundle.py): the static checks its dry run makes before a
lent minute is spent, on made-up wheels and, when it has been prepared, on gpu-bundle/ itself.
Nothing here downloads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "scripts" / "gpu_bundle.py")
assert spec is not None and spec.loader is not None
gpu_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bundle)


@pytest.mark.parametrize(
    "name",
    [
        "grpcio-1.85.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        "rapidfuzz-3.14.6-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        "protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl",
        "fastapi-0.165.0-py3-none-any.whl",
    ],
)
def test_wheels_for_cpython_312_on_manylinux_x86_64_pass(name):
    assert gpu_bundle.wheel_errors(name) == []


@pytest.mark.parametrize(
    "name",
    [
        "grpcio-1.85.4-cp311-cp311-manylinux2014_x86_64.whl",  # another Python
        "rapidfuzz-3.14.6-cp312-cp312-manylinux_2_34_x86_64.whl",  # a newer glibc
        "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_aarch64.whl",  # Arm
        "pydantic_core-2.50.5-cp312-cp312-macosx_11_0_arm64.whl",
        "protobuf-7.36.2-cp313-abi3-manylinux2014_x86_64.whl",  # stable ABI of a later Python
        "notawheel.tar.gz",
    ],
)
def test_wheels_that_would_not_install_there_are_named(name):
    errors = gpu_bundle.wheel_errors(name)
    assert len(errors) == 1 and errors[0].startswith(name)


def fake_wheel(folder: Path, dist: str, requires: list[str]) -> Path:
    path = folder / f"{dist}-1.0-py3-none-any.whl"
    lines = ["Metadata-Version: 2.1", f"Name: {dist}", "Version: 1.0"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}-1.0.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_a_requirement_neither_shipped_nor_on_the_device_is_an_error(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "fastapi", ["starlette>=1", "opentelemetry-api>=1.44", "anyio>=4"])
    fake_wheel(wheels, "starlette", ["typing-extensions; python_version < '3.13'"])
    fake_wheel(wheels, "uvicorn", ["uvloop; extra == 'standard'", "a; sys_platform == 'win32'"])
    report = gpu_bundle.Report()
    gpu_bundle.check_requirements(tmp_path, report)
    assert report.errors == ["fastapi-1.0-py3-none-any.whl requires opentelemetry-api: "
                             "neither shipped nor there"]  # fmt: skip
    fake_wheel(wheels, "opentelemetry_api", ["typing-extensions>=4.5"])
    report = gpu_bundle.Report()
    gpu_bundle.check_requirements(tmp_path, report)
    assert report.errors == []


def test_a_changed_or_unlisted_file_fails_the_manifest_check(tmp_path):
    (tmp_path / "models").mkdir()
    config = tmp_path / "models" / "config.json"
    config.write_text("{}")
    entry = {"bytes": 2, "sha256": gpu_bundle.sha256(config)}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"models/config.json": entry}}))
    report = gpu_bundle.Report()
    gpu_bundle.check_manifest(tmp_path, report)
    assert all("models/config.json" not in e for e in report.errors)
    config.write_text("[]")  # same size, other bytes
    (tmp_path / "models" / "extra.bin").write_bytes(b"x")
    report = gpu_bundle.Report()
    gpu_bundle.check_manifest(tmp_path, report)
    assert "models/config.json: changed since prepare (size or sha256)" in report.errors
    assert "models/extra.bin: in the bundle but not in its manifest" in report.errors


def test_the_device_command_is_short_parses_and_is_the_documented_one():
    report = gpu_bundle.Report()
    gpu_bundle.check_command(gpu_bundle.DEVICE_COMMAND, report)
    assert report.errors == []
    assert len(gpu_bundle.DEVICE_COMMAND) <= gpu_bundle.COMMAND_LIMIT
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert gpu_bundle.DEVICE_COMMAND in docs and '["gpu-bundle"]' in docs
    bad = gpu_bundle.Report()
    gpu_bundle.check_command("echo (" + "x" * gpu_bundle.COMMAND_LIMIT, bad)
    assert len(bad.errors) == 2


def test_the_device_script_refuses_to_start_without_a_bundle(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "GPU_CHECK_BUNDLE": str(tmp_path / "none")}
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "manifest.json missing: run 'make gpu-check-bundle'" in run.stderr


def test_the_prepared_bundle_passes_the_static_checks():
    if not (gpu_bundle.BUNDLE / "manifest.json").is_file():
        pytest.skip("gpu-bundle/ is not prepared here (make gpu-check-bundle downloads it)")
    report = gpu_bundle.check_bundle()
    assert report.errors == [], report.text()


def device_script(tmp_path: Path, python: str, **settings: str) -> tuple[int, str]:
    """bench/gpu_check.sh on a made-up bundle with ``python`` as every stage's interpreter;
    (exit code, summary.txt)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text("{}")
    env = {"PATH": "/usr/bin:/bin", "GPU_CHECK_BUNDLE": str(bundle), "GPU_CHECK_WHEELS": "none"}
    env |= {"PYTHON": python, **settings}
    out = tmp_path / "out"
    script = ROOT / "bench" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script), str(out)], env=env, capture_output=True, timeout=60)
    return run.returncode, (out / "summary.txt").read_text()


def test_a_failing_stage_does_not_stop_the_others(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$2" = loss ] && exit 0\necho "stage $2 broke"; exit 3\n')
    fake.chmod(0o755)
    rc, summary = device_script(tmp_path, str(fake))
    assert rc != 0
    rows = [line.split(" | ")[:2] for line in summary.splitlines()[2:]]
    assert rows == [
        ["| env", "FAILED (exit 3)"],
        ["| teacher", "FAILED (exit 3)"],
        ["| train-fsdp", "FAILED (exit 3)"],
        ["| loss", "ok"],
        ["| train-ddp", "FAILED (exit 3)"],
    ]
    assert "stage teacher broke" in (tmp_path / "out" / "teacher.txt").read_text()


def test_stages_are_chosen_and_the_budget_bounds_the_run(tmp_path):
    rc, summary = device_script(tmp_path, "true", GPU_CHECK_STAGES="loss env")
    assert rc == 0 and [line.split(" | ")[0] for line in summary.splitlines()[2:]] == [
        "| env",
        "| loss",
    ]
    rc, summary = device_script(tmp_path, "true", GPU_CHECK_BUDGET_S="5")
    assert rc != 0 and summary.count("skipped: the run's budget is spent") == 5
