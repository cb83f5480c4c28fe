"""Prepare, check and dry-run the GPU check's bundle (issue #24).

The lent accelerator machine has its own python3 (3.12, a CUDA torch, transformers, grpcio, ...)
and no network; each call carries at most 64 MiB of files. Everything else the GPU check needs
travels in one git-ignored folder, ``gpu-bundle/``:

- ``wheels/``: 3.12 manylinux x86_64 (or pure-Python) wheels of the packages the check imports
  that the machine lacks, plus grpcio and protobuf pinned to the versions the generated gRPC code
  was made with; every version is the one installed here, where the tests pass with it;
- ``models/``: the two shipped tokenizers as Hugging Face folders (so neither mistral-common nor
  gguf travels) and SmolLM2-135M's config: its weights (98 MB as a GGUF) do not fit, so the check
  builds a model of the same architecture with seeded random weights there
  (``bench/gpu_check.py``); tiny Llamas are built there the same way;
- ``manifest.json``: every file's size and sha256, each wheel's distribution and version.

Commands (run with the project's venv python):
  prepare   build gpu-bundle/ (downloads the wheels; prints sizes)
  check     the static checks: sizes against the limit, wheel tags, one version per package,
            the manifest, the device command's length and syntax (no downloads)
  dry-run   check, then run the device command here on the CPU with a Python that has only the
            device's packages, installing the bundle's wheels into a target folder as there
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "gpu-bundle"
DRY = ROOT / ".gpu-dry"
MIB = 2**20
CARRY_LIMIT = 64 * MIB  # what one call to the device may carry: working tree + carried paths
CARRY_MARGIN = 16 * MIB  # kept free: the tree grows, and a second wheel version must still fit
COMMAND_LIMIT = 2000
# the command the device runs, exactly; `run` carries ["gpu-bundle"] with it
DEVICE_COMMAND = 'PYTHONUNBUFFERED=1 bash bench/gpu_check.sh "$OUT"'
PYTHON_TAG = "cp312"
MAX_GLIBC = (2, 28)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]

# distribution -> why it travels (the device image lacks it, or has an unknown older version)
WHEELS = {
    "pydantic": "settings of every service and the trainer",
    "pydantic-core": "pydantic's compiled core",
    "pydantic-settings": "BaseSettings (teacher, aligner, trainer)",
    "python-dotenv": "imported by pydantic-settings",
    "annotated-types": "needed by pydantic",
    "typing-inspection": "needed by pydantic",
    "typing-extensions": "pydantic-core needs a newer one than the image may have",
    "rapidfuzz": "the aligner's vocabulary maps and alignment (MinED)",
    "fastapi": "the aligner's REST side, started with its gRPC side",
    "opentelemetry-api": "imported by fastapi",
    "starlette": "fastapi's base",
    "uvicorn": "the aligner's REST server",
    "httptools": "the aligner's HTTP protocol is uvicorn's httptools one (http_guard)",
    "grpcio": "the generated stubs need grpcio >= the version they were made with",
    "grpcio-health-checking": "readiness of teachers and the aligner",
    "grpcio-reflection": "the teacher and aligner register reflection",
    "protobuf": "the generated messages need the protobuf major they were made with",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> set[str]:
    text = (ROOT / "bench" / "device-packages.txt").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return {normalize(n) for line in lines for n in line.split()}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(dist: str, dest: Path, python_version: str) -> None:
    """One wheel, no dependencies (each is listed in WHEELS), for ``python_version``."""
    version = metadata.version(dist)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd.append(f"{dist}=={version}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: pip download {dist}=={version} failed:\n{result.stderr[-2000:]}")


def export_models(models: Path) -> None:
    """The shipped tokenizers as HF folders, and SmolLM2-135M's config beside its tokenizer."""
    from transformers import AutoConfig

    from fuseserve import shipped

    shipped.mistral_v1_tokenizer().save_pretrained(models / "mistral-v1")
    smollm2 = models / "smollm2-135m"
    shipped.smollm2_tokenizer().save_pretrained(smollm2)
    gguf = shipped.smollm2_gguf()
    AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(smollm2)


def prepare(bundle: Path) -> None:
    """Build ``bundle`` from scratch; print its files and sizes."""
    if bundle.exists():
        shutil.rmtree(bundle)
    wheels, models = bundle / "wheels", bundle / "models"
    wheels.mkdir(parents=True)
    for dist in WHEELS:
        print(f"downloading {dist}=={metadata.version(dist)} (3.12)", flush=True)
        pip_download(dist, wheels, "3.12")
    export_models(models)
    write_manifest(bundle)
    report = check_bundle(bundle)
    print(report.text())
    if report.errors:
        raise SystemExit(1)


def write_manifest(bundle: Path) -> None:
    files = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel != "manifest.json":
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    wheels = {normalize(d): {"version": metadata.version(d), "why": w} for d, w in WHEELS.items()}
    manifest = {"python": "3.12", "platforms": PLATFORMS, "wheels": wheels, "files": files}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------------------------- checks
WHEEL_NAME = re.compile(
    r"^(?P<dist>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)"
    r"\.whl$"
)
MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_x86_64$")
LEGACY_MANYLINUX = {"manylinux1_x86_64": (2, 5), "manylinux2010_x86_64": (2, 12)}
LEGACY_MANYLINUX["manylinux2014_x86_64"] = (2, 17)


def platform_ok(plat: str) -> bool:
    """``any``, or a manylinux x86_64 tag this glibc (``MAX_GLIBC``) or older."""
    if plat == "any":
        return True
    match = MANYLINUX.match(plat)
    glibc = (int(match[1]), int(match[2])) if match else LEGACY_MANYLINUX.get(plat)
    return glibc is not None and glibc <= MAX_GLIBC


def python_ok(py: str, abi: str) -> bool:
    """Pure Python 3, CPython 3.12 itself, or the stable ABI of a CPython <= 3.12."""
    if abi == "none":
        return py in ("py3", PYTHON_TAG) or py.startswith("py3")
    if abi == PYTHON_TAG:
        return py == PYTHON_TAG
    match = re.fullmatch(r"cp3(\d+)", py)
    return abi == "abi3" and match is not None and int(match[1]) <= 12


def wheel_errors(name: str) -> list[str]:
    """What keeps the wheel file ``name`` from installing on CPython 3.12, manylinux x86_64."""
    match = WHEEL_NAME.match(name)
    if match is None:
        return [f"{name}: not a wheel file name"]
    tags = [
        (py, abi, plat)
        for py in match["py"].split(".")
        for abi in match["abi"].split(".")
        for plat in match["plat"].split(".")
    ]
    if not any(python_ok(py, abi) and platform_ok(plat) for py, abi, plat in tags):
        return [f"{name}: not for CPython 3.12 on manylinux x86_64 (glibc <= 2.28)"]
    return []


class Report:
    """The static checks' findings: lines to print, and errors (empty = passed)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.errors: list[str] = []

    def text(self) -> str:
        out = list(self.lines)
        out += [f"ERROR: {e}" for e in self.errors] or ["static checks passed"]
        return "\n".join(out)


def tree_bytes() -> int:
    """Bytes of what a call sends besides carried paths: tracked and untracked-not-ignored."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    names = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    paths = (ROOT / os.fsdecode(n) for n in names if n)
    return sum(p.lstat().st_size for p in paths if p.exists() or p.is_symlink())


def check_wheels(bundle: Path, report: Report) -> None:
    """Tags, one version per distribution, and every distribution of ``WHEELS`` present."""
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    seen: dict[str, str] = {}
    for wheel in wheels:
        report.errors += wheel_errors(wheel.name)
        match = WHEEL_NAME.match(wheel.name)
        if match is None:
            continue
        dist = normalize(match["dist"])
        if dist in seen:
            report.errors.append(f"two wheels of {dist}: {seen[dist]} and {wheel.name}")
        seen[dist] = wheel.name
        report.lines.append(f"  {wheel.stat().st_size / MIB:6.2f} MiB  {wheel.name}")
    missing = sorted({normalize(d) for d in WHEELS} - set(seen))
    if missing:
        report.errors.append(f"wheels missing (run prepare again): {', '.join(missing)}")


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel that apply on the device (CPython 3.12, Linux, no
    extras)."""
    import zipfile

    from packaging.requirements import Requirement

    env: dict[str, str] = {"python_version": "3.12", "python_full_version": "3.12.3"}
    env |= {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    env |= {"implementation_name": "cpython", "platform_python_implementation": "CPython"}
    env["extra"] = ""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.partition(":")[2].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.append(normalize(req.name))
    return out


def check_requirements(bundle: Path, report: Report) -> None:
    """Every requirement of every wheel is another wheel of the bundle or on the device (its
    versions there are not known here: the dry run's imports are the check of those)."""
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    shipped = {normalize(WHEEL_NAME.match(w.name)["dist"]) for w in wheels}  # type: ignore[index]
    there = device_packages()
    for wheel in wheels:
        for name in wheel_requirements(wheel):
            if name not in shipped and name not in there:
                report.errors.append(f"{wheel.name} requires {name}: neither shipped nor there")


def check_manifest(bundle: Path, report: Report) -> None:
    """Every file the manifest lists is there, unchanged, and nothing else is."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = manifest["files"]
    present = {
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    for rel in sorted(present - set(listed)):
        report.errors.append(f"{rel}: in the bundle but not in its manifest")
    for rel, entry in sorted(listed.items()):
        path = bundle / rel
        if not path.is_file():
            report.errors.append(f"{rel}: in the manifest but missing")
        elif path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            report.errors.append(f"{rel}: changed since prepare (size or sha256)")
    for need in ("mistral-v1/tokenizer.json", "smollm2-135m/config.json"):
        if f"models/{need}" not in listed:
            report.errors.append(f"models/{need}: missing (run prepare again)")


def check_command(command: str, report: Report) -> None:
    """The device command: at most ``COMMAND_LIMIT`` characters, and bash parses it."""
    report.lines.append(f"device command ({len(command)} characters): {command}")
    if len(command) > COMMAND_LIMIT:
        report.errors.append(f"device command: {len(command)} characters > {COMMAND_LIMIT}")
    parsed = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    if parsed.returncode != 0:
        report.errors.append(f"device command does not parse: {parsed.stderr.strip()}")
    script = ROOT / "bench" / "gpu_check.sh"
    parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    if parsed.returncode != 0:
        report.errors.append(f"bench/gpu_check.sh does not parse: {parsed.stderr.strip()}")


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def check_bundle(bundle: Path = BUNDLE, command: str = DEVICE_COMMAND) -> Report:
    """Every static check of the prepared ``bundle`` (see the module docstring)."""
    report = Report()
    check_command(command, report)
    if not (bundle / "manifest.json").is_file():
        report.errors.append(f"{bundle} is not prepared (make gpu-check-bundle)")
        return report
    report.lines.append(f"wheels in {bundle / 'wheels'}:")
    check_wheels(bundle, report)
    if not report.errors:
        check_requirements(bundle, report)
    check_manifest(bundle, report)
    for folder in sorted(p for p in (bundle / "models").glob("*") if p.is_dir()):
        size = bundle_bytes(folder) / MIB
        names = ", ".join(sorted(f.name for f in folder.iterdir()))
        report.lines.append(f"  {size:6.2f} MiB  models/{folder.name}/ ({names})")
    carried, tree = bundle_bytes(bundle), tree_bytes()
    total, allowed = carried + tree, CARRY_LIMIT - CARRY_MARGIN
    report.lines.append(
        f"bundle {carried / MIB:.2f} MiB + working tree {tree / MIB:.2f} MiB = "
        f"{total / MIB:.2f} MiB (allowed {allowed / MIB:.0f} MiB: the 64 MiB a call carries "
        f"less {CARRY_MARGIN / MIB:.0f} MiB of margin)"
    )
    if total > allowed:
        report.errors.append(f"{total / MIB:.2f} MiB to carry > {allowed / MIB:.0f} MiB")
    return report


# ---------------------------------------------------------------------------------- dry run
def with_requirements(names: set[str]) -> set[str]:
    """``names`` and, transitively, what their versions installed here require (a newer
    huggingface-hub here may need a package the device's older one does not)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {key: str(value) for key, value in default_environment().items()}
    env["extra"] = ""
    todo, seen = list(names), set(names)
    while todo:
        try:
            requires = metadata.requires(todo.pop()) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            name = normalize(req.name)
            if name not in seen and (req.marker is None or req.marker.evaluate(env)):
                seen.add(name)
                todo.append(name)
    return seen


def device_env(dry: Path) -> Path:
    """A venv whose only packages are this environment's of the device's list (linked, not
    copied): what the device lacks, it lacks too. Returns its python."""
    venv, site = dry / "venv", dry / "device-site"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True
    )
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    wanted = with_requirements(device_packages())
    for dist in metadata.distributions():
        if normalize(dist.metadata["Name"]) not in wanted:
            continue
        tops = {Path(f).parts[0] for f in dist.files or ()}
        for top in sorted(tops - {"..", "__pycache__"}):
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "device-site.pth").write_text(f"{site}\n")
    return venv / "bin" / "python"


def install_check_312(bundle: Path) -> None:
    """Install the wheels as pip on CPython 3.12 manylinux x86_64 would (into a throw-away
    folder): proves the set installs there together, whatever this Python's version."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    cmd += ["--abi", PYTHON_TAG, "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    with tempfile.TemporaryDirectory() as target:
        cmd += ["--target", target, *map(str, sorted((bundle / "wheels").glob("*.whl")))]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: the wheels do not install for 3.12:\n{result.stderr[-3000:]}")
    print("the wheels install together for CPython 3.12 (pip --python-version 3.12 --target)")


def local_wheels(bundle: Path, dest: Path) -> Path:
    """The bundle's wheels for this Python: the pure and stable-ABI ones as they are, the
    compiled ones downloaded again for this version (same distribution and version)."""
    here = f"cp3{sys.version_info.minor}"
    kept = dest / ".kept"  # compiled wheels downloaded by an earlier dry run, reused
    kept.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    for wheel in sorted((bundle / "wheels").glob("*.whl")):
        match = WHEEL_NAME.match(wheel.name)
        assert match is not None
        py, abi = match["py"], match["abi"]
        if abi == "none" or (abi == "abi3" and int(py[3:]) <= sys.version_info.minor):
            shutil.copy2(wheel, dest / wheel.name)
            continue
        prefix = f"{match['dist']}-{match['version']}-{here}-"
        if not list(kept.glob(prefix + "*.whl")):
            print(f"  {match['dist']} {match['version']}: the {here} wheel for this dry run")
            pip_download(match["dist"], kept, f"3.{sys.version_info.minor}")
        for found in kept.glob(prefix + "*.whl"):
            shutil.copy2(found, dest / found.name)
    return dest


def dry_run(bundle: Path, dry: Path, stages: str = "") -> int:
    """Static checks, the 3.12 install, then the device command on this CPU (GPU_CHECK_DEVICE
    =cpu: the same stages, small sizes) with a device-like Python; 0 when every stage passed."""
    report = check_bundle(bundle)
    print(report.text(), flush=True)
    if report.errors:
        return 1
    install_check_312(bundle)
    python = device_env(dry)
    wheels = local_wheels(bundle, dry / "wheels-local")
    out = dry / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=str(python), OUT=str(out), GPU_CHECK_DEVICE="cpu")
    env.update(GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_BUNDLE=str(bundle))
    if stages:
        env["GPU_CHECK_STAGES"] = stages
    print(f"running the device command with {python} (CPU, small sizes) ...", flush=True)
    rc = subprocess.run(["bash", "-c", DEVICE_COMMAND], cwd=ROOT, env=env).returncode
    summary = out / "summary.txt"
    print(f"\n{summary}:\n{summary.read_text() if summary.exists() else '(none)'}")
    print(f"dry run {'passed' if rc == 0 else 'FAILED'} (results in {out})")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("prepare", "check", "dry-run"))
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--dry-dir", type=Path, default=DRY, help="the dry run's work folder")
    parser.add_argument("--stages", default="", help="dry-run: these stages only (default all)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.bundle)
        return 0
    if args.command == "check":
        report = check_bundle(args.bundle)
        print(report.text())
        return 1 if report.errors else 0
    return dry_run(args.bundle, args.dry_dir, args.stages)


if __name__ == "__main__":
    sys.exit(main())
