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


# the aligner's web server, cache and string matching: a teacher or a trainer never needs them
ALIGNER_ONLY = ("fastapi", "uvicorn", "redis", "rapidfuzz")


def test_the_teacher_and_the_trainer_need_nothing_of_the_aligner():
    """Teacher and trainer share only ``fuseserve.wire`` with the aligner: importing them loads
    no ``fuseserve.aligner`` module, and the CLI (which knows every service) runs ``teacher``
    without the aligner's dependencies, as in the teacher image."""
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{m!r}] = None\n" for m in ALIGNER_ONLY)
        + "import fuseserve.teacher.server, fuseserve.teacher.client\n"
        "import fuseserve.teacher.hf_backend, fuseserve.teacher.vllm_backend\n"
        "import fuseserve.teacher.tgi_backend, fuseserve.shipped, fuseserve.loading\n"
        "import fuseserve.trainer.prefetch, fuseserve.trainer.recipe, fuseserve.trainer.job\n"
        "import fuseserve.trainer.step, fuseserve.trainer.checkpoint, fuseserve.client\n"
        "bad = sorted(m for m in sys.modules if m.startswith('fuseserve.aligner'))\n"
        "print(bad)\n"
        "from fuseserve.cli import main\n"
        "try:\n"
        "    main(['teacher', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = run(code)
    assert result.returncode == 0, result.stdout[:2000] + result.stderr[-2000:]
    assert "--max-batch-texts" in result.stdout


def test_the_teacher_extra_installs_nothing_only_the_aligner_uses():
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "docker"))
    try:
        from pyproject_requirements import requirements
    finally:
        sys.path.pop(0)
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in requirements(project, ["teacher"])}
    assert not names & set(ALIGNER_ONLY), sorted(names)
    assert {"grpcio", "protobuf", "torch", "transformers"} <= names
