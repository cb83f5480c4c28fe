#!/usr/bin/env bash
# The GPU check (issue #24), made for the lent accelerator machine: its own python3 with a CUDA
# torch, no network, the packages it lacks carried as wheels in gpu-bundle/ (make
# gpu-check-bundle builds it here). Usage:
#     bash bench/gpu_check.sh [OUT]          results: OUT/*.txt (default: $OUT, else gpu-check/)
# The device command (docs/benchmarks.md, "GPU"): PYTHONUNBUFFERED=1 bash bench/gpu_check.sh "$OUT"
# with gpu-bundle carried. Stages, each its own process and timeout, none stopping the others:
#   env (GPU, versions, imports), teacher (served vs in-process, bf16, 512 and 2048 tokens),
#   train-fsdp (the recipe without Ray: FSDP2 in a process group of one, bf16 autocast, fused vs
#   CLM-only), loss (fused loss peak GPU memory, V = 32k and 128k), train-ddp (the same, no FSDP).
# The whole run is bounded by GPU_CHECK_BUDGET_S (default 330 s): a stage gets at most what is
# left, and one that would get under 20 s is skipped. Environment:
#   PYTHON            interpreter (default python3, the machine's own)
#   GPU_CHECK_DEVICE  cuda (default) or cpu: the same stages on the CPU at small sizes (dry run)
#   GPU_CHECK_BUNDLE  the bundle (default gpu-bundle); GPU_CHECK_WHEELS its wheels (default
#                     BUNDLE/wheels; "none": install nothing, PYTHON has every package)
#   GPU_CHECK_STAGES  the stages to run (default: all, in the order below), e.g. "env loss"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-check}}
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUNDLE=${GPU_CHECK_BUNDLE:-gpu-bundle}
WHEELS=${GPU_CHECK_WHEELS:-$BUNDLE/wheels}
STAGES=${GPU_CHECK_STAGES:-env teacher train-fsdp loss train-ddp}
DEADLINE=$(($(date +%s) + ${GPU_CHECK_BUDGET_S:-330}))
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
SUMMARY=$OUT/summary.txt
printf '| stage | result | seconds |\n|---|---|---|\n' >"$SUMMARY"

if [ "$DEVICE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=""
elif [ "$DEVICE" != cuda ]; then
    echo "error: GPU_CHECK_DEVICE must be cuda or cpu, not $DEVICE" >&2
    exit 2
fi
if [ ! -f "$BUNDLE/manifest.json" ]; then
    echo "error: $BUNDLE/manifest.json missing: run 'make gpu-check-bundle' here and carry $BUNDLE" >&2
    exit 2
fi

# the package: services/ is importable as fuseserve through a link, as build/pkgroot does here
mkdir -p "$WORK/pkgroot"
ln -s "$PWD/services" "$WORK/pkgroot/fuseserve"
{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    if [ "$WHEELS" != none ]; then
        echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $WORK/site"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check --target "$WORK/site" "$WHEELS"/*.whl 2>&1
    fi
} >"$OUT/env.txt" 2>&1 || echo "| install | FAILED (env.txt) | |" >>"$SUMMARY"
export PYTHONPATH="$WORK/site:$WORK/pkgroot${PYTHONPATH:+:$PYTHONPATH}"
# no network there: never ask the hub; no progress bars in the results
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false

# stage NAME LIMIT_S ARGS...: bench/gpu_check.py ARGS in its own process, output to OUT/NAME.txt
stage() {
    local name=$1 limit=$2 left start rc result
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    left=$((DEADLINE - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        echo "| $name | skipped: the run's budget is spent | 0 |" >>"$SUMMARY"
        return
    fi
    echo "== $name (at most ${limit} s)"
    start=$(date +%s)
    timeout -k 10 "$limit" "$PYTHON" bench/gpu_check.py "$@" --device "$DEVICE" \
        --bundle "$BUNDLE" --work "$WORK" >>"$OUT/$name.txt" 2>&1
    rc=$?
    case $rc in
        0) result=ok ;;
        124 | 137) result="TIMED OUT after ${limit} s" ;;
        *) result="FAILED (exit $rc)" ;;
    esac
    cat "$OUT/$name.txt"
    echo "| $name | $result | $(($(date +%s) - start)) |" | tee -a "$SUMMARY"
}

stage env 60 env
stage teacher 90 teacher
stage train-fsdp 120 train --parallel fsdp
stage loss 45 loss
stage train-ddp 90 train --parallel ddp
echo "== summary ($OUT)"
cat "$SUMMARY"
rm -rf "$WORK"
! grep -q -E 'FAILED|TIMED OUT|skipped' "$SUMMARY"
