#!/usr/bin/env bash
# Type-check the shipped package with mypy (settings: [tool.mypy] in pyproject.toml).
# The package is `fuseserve` but its folder is `services/`, so mypy reads it through a link.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
root=build/typecheck
mkdir -p "$root"
ln -sfn ../../services "$root/fuseserve"
MYPYPATH="$root" exec "$VENV/bin/mypy" --cache-dir build/mypy-cache -p fuseserve "$@"
