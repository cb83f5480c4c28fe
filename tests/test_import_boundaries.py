"""Import boundaries the images rely on: the core does no I/O, the aligner runs without torch."""

from __future__ import annotations

import subprocess
import sys

CORE = [
    "fuseserve.aligner.tokenview",
    "fuseserve.aligner.vocabmap",
    "fuseserve.aligner.alignment",
    "fuseserve.aligner.projection",
    "fuseserve.aligner.fusion",
    "fuseserve.aligner.options",
    "fuseserve.aligner.pipeline",
    "fuseserve.aligner.spans",
    "fuseserve.aligner.continuation",
    "fuseserve.aligner.cooccurrence",
    "fuseserve.wire.codec",
    "fuseserve.wire.messages",
]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_core_imports_no_network_cache_web_or_torch():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "bad = [m for m in ('torch', 'grpc', 'redis', 'fastapi', 'uvicorn', 'ray', 'httpx')"
        " if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = run(code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_aligner_service_and_cli_work_without_torch_or_ray():
    """The aligner image installs only the `aligner` extra: no torch, no Ray."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['ray'] = None\n"
        "import fuseserve.aligner.service.app\n"
        "from fuseserve.cli import main\n"
        "sys.argv = ['fuseserve', 'aligner', '--help']\n"
        "try:\n"
        "    main(['aligner', '--help'])\n"
        "except SystemExit as exc:\n"
        "    sys.exit(exc.code)\n"
    )
    result = run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--teacher" in result.stdout


def test_every_experiment_module_imports_on_its_own():
    """Each module can be the first one imported (no import cycle between them)."""
    modules = ["config", "corpus", "models", "ensemble", "merge", "stats", "runner", "report"]
    for name in modules:
        result = run(f"import fuseserve.experiment.{name}")
        assert result.returncode == 0, f"{name}: {result.stderr[-1500:]}"
