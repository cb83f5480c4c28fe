#!/usr/bin/env bash
# Regenerate the committed Python stubs from proto/ (needs grpcio-tools from the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
tmp="$(mktemp -d)"
$PY -m grpc_tools.protoc -Iproto --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  proto/fuseserve/wire/v1/*.proto
mkdir -p services/wire/v1
cp "$tmp"/fuseserve/wire/v1/*.py "$tmp"/fuseserve/wire/v1/*.pyi services/wire/v1/
printf '"""Generated gRPC stubs (scripts/gen_proto.sh); do not edit."""\n' > services/wire/v1/__init__.py
rm -rf "$tmp"
