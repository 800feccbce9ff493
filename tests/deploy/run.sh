#!/usr/bin/env bash
# The deployment test (`make test-deploy`, run by .ci/run after `make test`): from nothing to
# the compose stack serving through nginx, checked, and torn down again.
#
#   1. installs docker.io, docker-compose and debootstrap from Debian when missing (root);
#   2. starts its own dockerd (--iptables=false --bridge=none, a private socket and data root)
#      and stops it by PID on exit, whatever happened;
#   3. builds every image offline: a Debian base (debootstrap), a Python base, redis,
#      prometheus and nginx from Debian packages, and the CacheBlend image from the
#      wheelhouse (`make wheelhouse`);
#   4. `up` with docker/compose.test.yml (host network, 127.0.0.1 only), waits for health;
#   5. runs tests/deploy/check_stack.py against the stack;
#   6. `down -v` and checks that nothing is left running.
#
# Every wait has a deadline and fails with a message; logs go to out/deploy/ (printed on failure).
# Environment: DEPLOY_STATE_DIR (daemon data root; kept between runs as the build cache),
# DEBIAN_MIRROR, DEPLOY_KEEP_STACK=1 (leave the stack and daemon up for debugging).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

PROJECT=cacheblend-test
STATE=$(realpath -m "${DEPLOY_STATE_DIR:-/var/tmp/cacheblend-deploy}")
LOGS=$ROOT/out/deploy
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=cacheblend-offline/debian:bookworm
PYTHON_IMAGE=cacheblend-offline/python:3.11
APP_IMAGE=cacheblend:cpu
PORTS=(18000 18001 18002 16379 19090)
PY=$ROOT/.venv/bin/python
# Debian's docker CLI: its BuildKit client speaks to this daemon without the buildx plugin that
# a newer CLI earlier on PATH (e.g. /usr/local/bin/docker) would need for --secret and mounts.
DOCKER=/usr/bin/docker
export DOCKER_HOST=unix://$STATE/docker.sock
export DOCKER_BUILDKIT=1
COMPOSE=(docker-compose --ansi never -p "$PROJECT" -f docker/docker-compose.yml -f docker/compose.test.yml)

mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/timings.txt
DOCKERD_PID=""
STACK_UP=""

step() { echo "[test-deploy $(date -u +%T) +${SECONDS}s] $*"; }
FAILED_AT=""
fail() { FAILED_AT="$*"; echo "test-deploy: FAILED: $*" >&2; exit 1; }
timing() { echo "$1 $2" >> "$LOGS/timings.txt"; step "$1: $2"; }

# Print the end of a log file (on failure).
show() { echo "----- last lines of $1 -----" >&2; tail -n "${2:-40}" "$1" >&2 || true; echo "-----" >&2; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "${DEPLOY_KEEP_STACK:-}" ] && [ "$rc" != 0 ]; then
        step "DEPLOY_KEEP_STACK: leaving the stack and dockerd (pid $DOCKERD_PID, DOCKER_HOST=$DOCKER_HOST) up"
        exit "$rc"
    fi
    if [ -n "$STACK_UP" ]; then
        for c in $($DOCKER ps -aq --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
            name=$($DOCKER inspect -f '{{.Name}}' "$c" 2>/dev/null | tr -d /)
            $DOCKER logs --timestamps "$c" > "$LOGS/container-$name.log" 2>&1
            [ "$rc" = 0 ] || show "$LOGS/container-$name.log" 30
        done
        timeout 180 "${COMPOSE[@]}" down -v --remove-orphans --timeout 30 > "$LOGS/down-cleanup.log" 2>&1 \
            || { echo "test-deploy: compose down failed during cleanup" >&2; show "$LOGS/down-cleanup.log"; }
    fi
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        step "stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "test-deploy: dockerd did not stop in 30 s; killing it" >&2
            kill -KILL "$DOCKERD_PID"
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        # dockerd leaves its bind mount of the host's network namespace behind.
        umount "$STATE/exec/netns/default" 2>/dev/null
    fi
    if [ "$rc" != 0 ]; then
        # Again at the very end, after the container logs: a CI view that keeps only the
        # output's tail still shows which check failed and why.
        [ -s "$LOGS/checks.log" ] && show "$LOGS/checks.log" 25
        [ -n "$FAILED_AT" ] && echo "test-deploy: FAILED: $FAILED_AT" >&2
        echo "test-deploy: FAILED (exit $rc) after ${SECONDS}s; logs in $LOGS" >&2
    else
        step "passed in ${SECONDS}s"
        cat "$LOGS/timings.txt"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs "$@" up to $1 times (the first argument), with a pause between attempts.
retry() {
    local tries=$1 n=1
    shift
    until "$@"; do
        [ "$n" -ge "$tries" ] && return 1
        echo "test-deploy: attempt $n of $tries failed: $*; retrying" >&2
        n=$((n + 1))
        sleep 5
    done
}

# --- 1. packages ----------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || fail "needs root (it installs Debian packages and runs dockerd)"
[ -x "$PY" ] || fail "$PY missing: run through \`make test-deploy\` (it creates .venv)"
missing=()
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || missing+=(docker.io)
command -v docker-compose > /dev/null || missing+=(docker-compose)
command -v debootstrap > /dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]} from Debian"
    apt_install() {
        apt-get -o Acquire::Retries=3 update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq "${missing[@]}"
    }
    retry 3 apt_install > "$LOGS/apt.log" 2>&1 || { show "$LOGS/apt.log"; fail "apt-get install ${missing[*]}"; }
fi

# --- 2. dockerd -----------------------------------------------------------------------------
mkdir -p "$STATE"
# One run at a time per data root: a second one waits (it would share, and stop, this daemon).
exec 9> "$STATE/lock"
flock -w 1800 9 || fail "another make test-deploy has held $STATE/lock for 30 min"
if [ -f "$STATE/dockerd.pid" ]; then  # a daemon of an earlier run that was killed itself
    old=$(cat "$STATE/dockerd.pid")
    if [ -n "$old" ] && [ "$(cat "/proc/$old/comm" 2>/dev/null)" = dockerd ]; then
        step "stopping the dockerd an earlier run left (pid $old)"
        kill -TERM "$old"
        for _ in $(seq 60); do kill -0 "$old" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$old" 2>/dev/null && kill -KILL "$old"
    fi
    rm -f "$STATE/dockerd.pid"
fi
step "starting dockerd (data root $STATE/docker)"
/usr/sbin/dockerd --iptables=false --ip-masq=false --ip-forward=false --bridge=none \
    --data-root "$STATE/docker" --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" \
    -H "$DOCKER_HOST" > "$LOGS/dockerd.log" 2>&1 &
DOCKERD_PID=$!
deadline=$((SECONDS + 90))
until $DOCKER info > /dev/null 2>&1; do
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
        show "$LOGS/dockerd.log"
        fail "dockerd exited at start-up (log above): this machine cannot run the Docker engine"
    fi
    if [ $SECONDS -ge $deadline ]; then
        show "$LOGS/dockerd.log"
        fail "dockerd did not answer within 90 s (log above)"
    fi
    sleep 0.5
done
driver=$($DOCKER info -f '{{.Driver}}')
step "dockerd up (pid $DOCKERD_PID, storage driver $driver)"
[ "$driver" = overlay2 ] || echo "test-deploy: warning: storage driver $driver (not overlay2): builds will be slow and large" >&2

# A stack an earlier, interrupted run left behind (same data root).
"${COMPOSE[@]}" down -v --remove-orphans --timeout 10 > "$LOGS/down-stale.log" 2>&1 || true

# --- 3. images ------------------------------------------------------------------------------
t0=$SECONDS
if ! $DOCKER image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    step "debootstrap bookworm (minbase) -> $BASE_IMAGE"
    rootfs=$STATE/rootfs
    # debootstrap mounts /proc and /sys inside the tree; one that failed half-way may leave them.
    bootstrap() {
        awk '{print $2}' /proc/mounts | grep "^$rootfs/" | sort -r | xargs -r umount -l
        rm -rf "$rootfs" && debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR"
    }
    retry 2 bootstrap > "$LOGS/debootstrap.log" 2>&1 || { show "$LOGS/debootstrap.log"; fail "debootstrap"; }
    tar -C "$rootfs" -c . | $DOCKER import - "$BASE_IMAGE" > /dev/null || fail "docker import of the base image"
    rm -rf "$rootfs"
fi
timing base_image_s $((SECONDS - t0))

t0=$SECONDS
# Torch only from pip's configured sources when the PyTorch index is unreachable (offline CI).
torch_index=https://download.pytorch.org/whl/cpu
"$PY" -c "import socket; socket.getaddrinfo('download.pytorch.org', 443)" 2> /dev/null || torch_index=
step "make wheelhouse TORCH_INDEX=$torch_index"
retry 2 make --no-print-directory wheelhouse PYTHON="$PY" TORCH_INDEX="$torch_index" > "$LOGS/wheelhouse.log" 2>&1 \
    || { show "$LOGS/wheelhouse.log"; fail "make wheelhouse"; }
timing wheelhouse_s $((SECONDS - t0))

# build NAME TIMEOUT_S DOCKER-BUILD-ARGS...: one image, logged to build-NAME.log, timed.
build() {
    local name=$1 limit=$2 t=$SECONDS
    shift 2
    step "building $name"
    if ! retry 2 timeout "$limit" $DOCKER build --network host --progress plain "$@" > "$LOGS/build-$name.log" 2>&1; then
        show "$LOGS/build-$name.log" 60
        fail "docker build of $name (log above; limit ${limit}s per attempt)"
    fi
    timing "build_${name}_s" $((SECONDS - t))
}
build python 600 --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$PYTHON_IMAGE" docker/images/python
for svc in redis prometheus nginx; do
    build "$svc" 600 --build-arg BASE_IMAGE="$BASE_IMAGE" -t "cacheblend-offline/$svc" \
        -f "docker/images/$svc/Dockerfile" docker/images
done
# The CA bundle is the one pip would need for any index (unused with WHEELHOUSE=1; shows how).
build cacheblend 1500 -f docker/Dockerfile --build-arg BASE_IMAGE="$PYTHON_IMAGE" --build-arg WHEELHOUSE=1 \
    --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt -t "$APP_IMAGE" .
timing image_size_mb $(( $($DOCKER image inspect -f '{{.Size}}' "$APP_IMAGE") / 1000000 ))

# Whether a server could listen on 127.0.0.1:PORT (SO_REUSEADDR, as servers do: connections
# of the checks left in TIME_WAIT do not count).
port_free() {
    "$PY" -c "import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $1)); s.listen()" 2> /dev/null
}

# --- 4. up ----------------------------------------------------------------------------------
busy=()
for port in "${PORTS[@]}"; do
    port_free "$port" || busy+=("$port")
done
[ ${#busy[@]} -eq 0 ] || fail "ports ${busy[*]} on 127.0.0.1 are in use (docker/compose.test.yml needs them): $(ss -ltnp 2>/dev/null | grep -E ":(${busy[*]// /|}) " || true)"

step "compose up"
t0=$SECONDS
STACK_UP=1
if ! timeout 300 "${COMPOSE[@]}" up -d --no-build > "$LOGS/up.log" 2>&1; then
    show "$LOGS/up.log"
    "${COMPOSE[@]}" ps >&2 || true
    "${COMPOSE[@]}" logs --tail 30 >&2 || true
    fail "compose up (log above)"
fi
deadline=$((SECONDS + 180))
healthy() { "$PY" -c "import urllib.request; urllib.request.urlopen('$1', timeout=5)" 2> /dev/null; }
until healthy http://127.0.0.1:18000/health; do
    if [ $SECONDS -ge $deadline ]; then
        "${COMPOSE[@]}" ps >&2 || true
        "${COMPOSE[@]}" logs --tail 30 >&2 || true
        fail "nginx (127.0.0.1:18000) did not answer /health within 180 s of compose up"
    fi
    sleep 1
done
timing up_to_healthy_behind_nginx_s $((SECONDS - t0))

# --- 5. checks ------------------------------------------------------------------------------
step "checks (tests/deploy/check_stack.py)"
export DEPLOY_DOCKER=$DOCKER DEPLOY_PROJECT=$PROJECT DEPLOY_IMAGE=$APP_IMAGE DEPLOY_LOGS=$LOGS
if ! timeout 1200 "$PY" -m pytest -q -p no:cacheprovider tests/deploy/check_stack.py 2>&1 | tee "$LOGS/checks.log"; then
    fail "deployment checks (above; container logs in $LOGS)"
fi
timing startup_to_healthy_s "$(cat "$LOGS/startup_s.txt")"

# --- 6. down --------------------------------------------------------------------------------
step "compose down -v"
for c in $($DOCKER ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do
    name=$($DOCKER inspect -f '{{.Name}}' "$c" | tr -d /)
    $DOCKER logs --timestamps "$c" > "$LOGS/container-$name.log" 2>&1
done
timeout 180 "${COMPOSE[@]}" down -v --remove-orphans --timeout 30 > "$LOGS/down.log" 2>&1 \
    || { show "$LOGS/down.log"; fail "compose down -v"; }
STACK_UP=""
left=$($DOCKER ps -aq --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || fail "containers left after down -v: $left"
left=$($DOCKER volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
[ -z "$left" ] || fail "volumes left after down -v: $left"
left=$($DOCKER ps -q)
[ -z "$left" ] || fail "containers still running after down -v: $left"
for port in "${PORTS[@]}"; do
    port_free "$port" || fail "127.0.0.1:$port still in use after down -v"
done
# The data root is the build cache of the next run: keep it bounded (superseded images, cache).
$DOCKER image prune -f > /dev/null || true
$DOCKER builder prune -f --keep-storage 12GB > /dev/null || true
timing total_s $SECONDS
