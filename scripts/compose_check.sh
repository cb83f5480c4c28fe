#!/usr/bin/env bash
# Build every image and run the compose stack end to end on this machine, then take it down.
#
#   scripts/compose_check.sh [--install-engine] [--no-build] [--keep] [--running]
#
#   --install-engine  as root: install Debian's docker.io, docker-compose and debootstrap when
#                     missing and start dockerd when no engine answers
#   --no-build        use the images already built
#   --keep            leave the stack running (default: `compose down -v` at the end)
#   --running         only check a stack that is already up (no build, no up, no down)
#
# Base images that cannot be pulled (no registry reachable) are replaced by local stand-ins made
# from Debian packages (debootstrap + docker import): PYTHON_IMAGE and REDIS_IMAGE, unless set.
# pip inside the builds trusts $PIP_CERT when set (copied to docker/build-context/ca.pem, build
# stage only); torch comes from a local wheel (the folders in $PIP_FIND_LINKS) when TORCH_INDEX
# cannot be reached. Checks, from the host: every service healthy; REST POST /v1/fuse on the
# published port returns a valid fused block; the aligner's gRPC health is SERVING; the aligner
# reports its cache reachable and Redis holds fused keys after the query; the trainer runs fused
# steps (its metrics file shows progress); every fuseserve container runs as uid 10001; the
# aligner image has no torch. Exit 1 naming the failing service, with its logs.
# Broken-service drill: SMOLLM2_TEACHER_MODEL=/data/nonexistent scripts/compose_check.sh --no-build
# (the teacher exits at start, naming the missing model; the check fails naming teacher-smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."

INSTALL_ENGINE=0 BUILD=1 KEEP=0 RUNNING=0
for arg in "$@"; do
    case "$arg" in
        --install-engine) INSTALL_ENGINE=1 ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        --running) RUNNING=1 BUILD=0 KEEP=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compose_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

START=$(date +%s)
SUMMARY=()
log() { printf '[compose-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
note() { SUMMARY+=("$*"); log "$*"; }
HOST_PY=${HOST_PY:-python3}
REST=${REST:-http://127.0.0.1:8080}
STACK_UP=0

fail() {  # fail SERVICE MESSAGE: name it, show its logs, take the stack down, exit 1
    local service=$1
    shift
    log "FAIL: $service: $*"
    if [ "$STACK_UP" = 1 ] && [ "$service" != engine ]; then
        log "last 60 log lines of $service:"
        $COMPOSE logs --no-color --tail 60 "$service" 2>&1 | sed 's/^/    /' || true
    fi
    exit 1
}

cleanup() {
    if [ "$STACK_UP" = 1 ] && [ "$KEEP" = 0 ]; then
        log "compose down -v"
        $COMPOSE down -v --remove-orphans >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# --- the engine and Compose --------------------------------------------------------------------
if [ "$INSTALL_ENGINE" = 1 ]; then
    [ "$(id -u)" = 0 ] || fail engine "--install-engine needs root"
    missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null \
        || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} from Debian's packages"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (log: /var/log/fuseserve-dockerd.log)"
        nohup dockerd >/var/log/fuseserve-dockerd.log 2>&1 &
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
fi
docker info >/dev/null 2>&1 || fail engine "no Docker engine answers (as root: --install-engine)"
if docker compose version >/dev/null 2>&1; then
    COMPOSE="docker compose"
elif command -v docker-compose >/dev/null; then
    COMPOSE=docker-compose
else
    fail engine "neither 'docker compose' nor 'docker-compose' is installed"
fi
note "engine: Docker $(docker version -f '{{.Server.Version}}'), compose: $($COMPOSE version --short 2>/dev/null || $COMPOSE version | head -1)"

# --- base images: pulled, or stand-ins from Debian packages -------------------------------------
STANDIN_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/fuseserve/compose-check
standin_rootfs() {  # a bookworm root filesystem with Python 3.11 and Redis, as a tarball
    local tarball=$STANDIN_CACHE/bookworm-python-redis.tar
    if [ ! -f "$tarball" ]; then
        command -v debootstrap >/dev/null || fail engine "no debootstrap for the stand-in base images (--install-engine installs it)"
        log "debootstrap bookworm (python3, redis) for the stand-in base images" >&2
        mkdir -p "$STANDIN_CACHE"
        local root
        root=$(mktemp -d)
        debootstrap --variant=minbase \
            --include=python3,python3-venv,python-is-python3,ca-certificates,redis-server,redis-tools \
            bookworm "$root" http://deb.debian.org/debian >"$STANDIN_CACHE/debootstrap.log" 2>&1 \
            || fail engine "debootstrap failed (log: $STANDIN_CACHE/debootstrap.log)"
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
    fi
    echo "$tarball"
}
ensure_base() {  # ensure_base VAR DEFAULT STANDIN_TAG: export VAR as an image that exists here
    local var=$1 default=$2 standin=$3
    local ref=${!var:-$default}
    if docker image inspect "$ref" >/dev/null 2>&1 || timeout 60 docker pull -q "$ref" >/dev/null 2>&1; then
        export "$var=$ref"
    else
        if ! docker image inspect "$standin" >/dev/null 2>&1; then
            docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
                "$(standin_rootfs)" "$standin" >/dev/null
        fi
        export "$var=$standin"
        note "base image $ref cannot be pulled: using the stand-in $standin (Debian bookworm)"
    fi
}
ensure_base PYTHON_IMAGE python:3.11-slim-bookworm fuseserve-standin/python:3.11-bookworm
ensure_base REDIS_IMAGE redis:7.4-alpine fuseserve-standin/redis:7-bookworm

# --- build inputs: the CA bundle pip must trust, torch when its index is unreachable ------------
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    cp "$PIP_CERT" docker/build-context/ca.pem
fi
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ "$BUILD" = 1 ] && ! curl -fsS --max-time 10 -o /dev/null "$TORCH_INDEX/torch/" 2>/dev/null; then
    wheel=""
    for dir in ${PIP_FIND_LINKS:-} ${TORCH_WHEEL_DIR:-}; do
        for w in "$dir"/torch-"$TORCH_VERSION"*cp311*.whl; do [ -f "$w" ] && wheel=$w; done
    done
    [ -n "$wheel" ] || fail build "$TORCH_INDEX cannot be reached and no torch-$TORCH_VERSION wheel was found (set TORCH_WHEEL_DIR)"
    mkdir -p docker/build-context/wheels
    rm -f docker/build-context/wheels/torch-*.whl
    ln "$wheel" docker/build-context/wheels/ 2>/dev/null || cp "$wheel" docker/build-context/wheels/
    note "torch index $TORCH_INDEX unreachable: torch from $wheel"
fi
export TORCH_INDEX

# --- build --------------------------------------------------------------------------------------
image_size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }
if [ "$BUILD" = 1 ]; then
    for pair in teacher-small:fuseserve-teacher:cpu aligner:fuseserve-aligner prepare:fuseserve-trainer; do
        service=${pair%%:*} image=${pair#*:}
        t0=$(date +%s)
        log "building $image (service $service)"
        $COMPOSE build "$service" >"/tmp/compose-check-build-$service.log" 2>&1 || {
            tail -40 "/tmp/compose-check-build-$service.log" | sed 's/^/    /'
            fail "$service" "image $image did not build (log: /tmp/compose-check-build-$service.log)"
        }
        note "built $image in $(($(date +%s) - t0)) s, $(image_size "$image")"
    done
fi
# the CUDA teacher is not built here; its build arguments must still render
gpu_config=$(COMPOSE_PROFILES=gpu $COMPOSE config) || fail teacher-smollm2-gpu "the gpu profile does not validate"
grep -q "CUDA_IMAGE: ${CUDA_IMAGE:-nvidia/cuda:12.8.1-runtime-ubuntu24.04}" <<<"$gpu_config" \
    || fail teacher-smollm2-gpu "the gpu profile does not render the CUDA_IMAGE build argument"

# --- images: aligner without torch, every fuseserve image as uid 10001 --------------------------
docker run --rm --entrypoint python fuseserve-aligner -c \
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    || fail aligner "the aligner image contains torch"
for image in fuseserve-teacher:cpu fuseserve-aligner fuseserve-trainer; do
    uid=$(docker run --rm --entrypoint id "$image" -u)
    [ "$uid" = 10001 ] || fail "$image" "runs as uid $uid, not 10001"
done
note "aligner image has no torch; teacher, aligner and trainer images run as uid 10001"

# --- up, then wait until every service is healthy -----------------------------------------------
STACK_UP=1
if [ "$RUNNING" = 1 ]; then
    T_UP=$(date +%s)
    : >/tmp/compose-check-up.log
    sleep 0 &
else
    $COMPOSE down -v --remove-orphans >/dev/null 2>&1 || true
    T_UP=$(date +%s)
    log "compose up -d"
    $COMPOSE up -d >/tmp/compose-check-up.log 2>&1 &
fi
UP_PID=$!

state_of() {  # state_of SERVICE -> running/healthy/unhealthy/exited:N/missing
    local id
    id=$($COMPOSE ps -q "$1" 2>/dev/null | head -1)
    [ -n "$id" ] || { echo missing; return; }
    docker inspect -f '{{.State.Status}}:{{.State.ExitCode}}:{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" \
        | awk -F: '{ if ($1 == "exited") print "exited:" $2; else if ($3 != "") print $3; else print $1 }'
}
SERVICES=(redis prepare teacher-smollm2 teacher-small aligner trainer)
declare -A SEEN=()
deadline=$((T_UP + ${UP_TIMEOUT_S:-3600}))
while :; do
    pending=0
    for service in "${SERVICES[@]}"; do
        state=$(state_of "$service")
        case "$service:$state" in
            prepare:healthy | prepare:running | prepare:starting) pending=1 ;;  # one-shot: must finish
            prepare:exited:0 | *:healthy) [ -n "${SEEN[$service]:-}" ] || {
                SEEN[$service]=1; note "$service ready after $(($(date +%s) - T_UP)) s"; } ;;
            trainer:exited:0) SEEN[$service]=1 ;;  # done before the check looked: metrics decide
            *:exited:*) fail "$service" "exited with code ${state#exited:}" ;;
            *:unhealthy) fail "$service" "unhealthy (healthcheck failing)" ;;
            *) pending=1 ;;
        esac
    done
    [ "$pending" = 0 ] && break
    if ! kill -0 "$UP_PID" 2>/dev/null && ! wait "$UP_PID"; then
        sed 's/^/    /' /tmp/compose-check-up.log
        for service in "${SERVICES[@]}"; do
            case "$(state_of "$service")" in healthy | exited:0 | running) ;; *) fail "$service" "compose up failed: $(state_of "$service")" ;; esac
        done
        fail compose "compose up failed"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || fail "$(for s in "${SERVICES[@]}"; do [ -n "${SEEN[$s]:-}" ] || { echo "$s"; break; }; done)" "not ready after ${UP_TIMEOUT_S:-3600} s"
    sleep 5
done
note "all services healthy $(($(date +%s) - T_UP)) s after compose up"

# --- checks from the host -----------------------------------------------------------------------
"$HOST_PY" - "$REST" <<'EOF' || fail aligner "POST /v1/fuse did not return a valid fused block"
import json, math, sys, urllib.request
base = sys.argv[1]
text = "def fuse(models):\n    return sum(m.logits for m in models) / len(models)\n" * 4
req = urllib.request.Request(base + "/v1/fuse", data=json.dumps({"text": text, "top": 100}).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    body = json.load(r)
block = body["blocks"][0]
positions = block["positions"]
assert len(positions) > 10, f"only {len(positions)} positions"
assert {t["name"] for t in block["teachers"]} == {"smollm2", "small"}, block["teachers"]
scored = [p for p in positions if p["candidates"]]  # the last token has no next token
assert len(scored) >= 0.9 * len(positions), f"{len(scored)} of {len(positions)} scored"
for p in scored:
    probs = [c["prob"] for c in p["candidates"]]
    total = sum(probs) + p.get("tail", 0.0)
    assert all(0.0 <= q <= 1.0 for q in probs), p
    # every fused id listed (fewer than `top`): listed probabilities + tail mass are the whole
    assert total <= 1.0 + 1e-3, (p["position"], total)
    assert len(probs) == 100 or math.isclose(total, 1.0, abs_tol=1e-3), (p["position"], total)
print(f"POST /v1/fuse: {len(positions)} positions, teachers "
      f"{[(t['name'], round(t['coverage'], 3)) for t in block['teachers']]}")
EOF
note "REST POST $REST/v1/fuse returned a valid fused block"

aligner_id=$($COMPOSE ps -q aligner)
docker exec "$aligner_id" fuseserve probe --grpc 127.0.0.1:50061 >/dev/null \
    || fail aligner "gRPC health of the aligner is not SERVING"
"$HOST_PY" - "${GRPC_HOST_PORT:-127.0.0.1:50061}" <<'EOF' || fail aligner "the published gRPC port 50061 does not accept a connection"
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
socket.create_connection((host, int(port)), timeout=5).close()
EOF
note "aligner gRPC health SERVING (in the container) and port 50061 published"

readyz=$(curl -fsS --max-time 10 "$REST/readyz") || fail aligner "/readyz not 200"
echo "$readyz" | grep -q '"cache": *"ok"' || fail aligner "/readyz does not report the cache as ok: $readyz"
curl -fsS --max-time 10 "$REST/metrics" | grep -q '^fuseserve_aligner_cache_up 1' \
    || fail aligner "metric fuseserve_aligner_cache_up is not 1"
redis_id=$($COMPOSE ps -q redis)
keys=$(docker exec "$redis_id" redis-cli --scan --pattern 'fuseserve:*' | wc -l)
[ "$keys" -gt 0 ] || fail redis "no fuseserve:* keys in Redis after the fuse query"
note "cache reachable (/readyz cache ok, fuseserve_aligner_cache_up 1); Redis holds $keys fuseserve keys"

trainer_id=$($COMPOSE ps -q trainer)
metrics=/tmp/compose-check-trainer-metrics.jsonl
deadline=$(($(date +%s) + ${TRAIN_TIMEOUT_S:-900}))
while :; do
    docker cp "$trainer_id:/data/runs/compose-fused-metrics.jsonl" "$metrics" >/dev/null 2>&1 || true
    fused=$("$HOST_PY" -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(sum(1 for r in rows if r.get('fusion_loss', 0) > 0 and r.get('lam', 1) < 1))
" "$metrics" 2>/dev/null || echo 0)
    [ "$fused" -ge 3 ] && break
    case "$(state_of trainer)" in exited:0 | running | healthy) ;; *) fail trainer "$(state_of trainer)" ;; esac
    [ "$(date +%s)" -lt "$deadline" ] || fail trainer "fewer than 3 fused steps after ${TRAIN_TIMEOUT_S:-900} s"
    sleep 5
done
first=$("$HOST_PY" -c "
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if r.get('fusion_loss', 0) > 0]
steps = [r['step'] for r in rows]
assert steps == sorted(steps) and steps[-1] > steps[0], steps
print(f\"{len(rows)} fused steps so far, step {steps[-1]}: loss {rows[-1]['loss']:.3f} \"
      f\"(fusion {rows[-1]['fusion_loss']:.3f}), {rows[-1]['tokens_per_s']:.0f} tok/s\")
" "$metrics") || fail trainer "the metrics file shows no progress"
note "trainer: $first; first fused steps within $(($(date +%s) - T_UP)) s of compose up"

for service in redis teacher-smollm2 teacher-small aligner trainer; do
    id=$($COMPOSE ps -q "$service")
    user=$(docker inspect -f '{{.Config.User}}' "$id")
    case "$user" in 10001 | 10001:*) ;; *) fail "$service" "runs as '$user', not uid 10001" ;; esac
done
note "every container runs as uid 10001"

log "summary ($(($(date +%s) - START)) s in all):"
printf '    %s\n' "${SUMMARY[@]}"
log "PASS"
