#!/usr/bin/env bash
# `make compose-up-test`: runs the real docker-compose.yml on this machine and proves it works.
#
#  1. starts a Docker engine when none answers (and stops only the one it started);
#  2. uses debian:bookworm-slim when the engine has it or can pull it, else builds a local Debian
#     bookworm root with debootstrap and `docker import`s it (cached as herald-local/bookworm:12-slim);
#  3. builds local stand-ins for the two third-party images (SecantusDB for mongo:7, Debian's
#     redis-server for redis:7) and Herald's image from build/Dockerfile — the runtime stage users
#     get, fed by a release binary built here (HERALD_BUILD=prebuilt);
#  4. `docker-compose up` of docker-compose.yml plus build/compose-test/docker-compose.override.yml
#     (which only swaps those two images), waits for every service to be healthy by its own
#     HEALTHCHECK, checks the one-shot doctor and seed exited 0, that the scheduler delivered the first
#     messages to the sink container, and runs the Postman collection with the docker environment
#     against the published ports (127.0.0.1 only);
#  5. tears everything down with `down -v` and checks no container, network or volume is left.
#
# Environment: DEBIAN_MIRROR (debootstrap's mirror; default: the one apt's sources name),
# COMPOSE_TEST_TIMEOUT (seconds to wait for each stage, default 180), KEEP_DOCKERD=1 leaves an
# engine this script started running.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

STATE="$ROOT/.local/compose-test"
PROJECT=herald-compose-test
OVERRIDE=build/compose-test/docker-compose.override.yml
LOCAL_BASE=herald-local/bookworm:12-slim
MONGO_IMAGE=herald-local/secantus:test
REDIS_IMAGE=herald-local/redis:test
HERALD_IMAGE=herald:local
# The Debian mirror this machine's apt already uses (its sources name it), unless overridden.
apt_mirror() {
  local uri
  uri="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n 1)"
  [ -n "$uri" ] || uri="$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
    awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | grep -v security | head -n 1)"
  echo "${uri:-http://deb.debian.org/debian}"
}
DEBIAN_MIRROR="${DEBIAN_MIRROR:-$(apt_mirror)}"
TIMEOUT="${COMPOSE_TEST_TIMEOUT:-180}"
API_KEY=local-dev-api-key
mkdir -p "$STATE"

log() { printf '[compose-up-test] %s\n' "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

TIMES=()
STAGE_START=$SECONDS
stage_done() { TIMES+=("$(printf '%-44s %4ds' "$1" $((SECONDS - STAGE_START)))"); STAGE_START=$SECONDS; }

# --- tools -------------------------------------------------------------------------------------
missing=()
[ -x /usr/sbin/dockerd ] || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} from the OS packages"
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's client drives the engine's built-in BuildKit without a buildx plugin; a newer client on
# PATH without buildx cannot.
DOCKER=docker
[ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker
dk() { "$DOCKER" "$@"; }
compose() { docker-compose -p "$PROJECT" -f docker-compose.yml -f "$OVERRIDE" "$@"; }

# --- engine ------------------------------------------------------------------------------------
STARTED_DOCKERD=
cleanup() {
  local rc=$?
  if [ -n "${COMPOSE_UP:-}" ]; then
    if [ $rc -ne 0 ]; then
      log "what the services printed last:"
      compose ps >&2 || true
      compose logs --no-color --tail 40 >&2 || true
    fi
    compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1 || true
  fi
  if [ -n "$STARTED_DOCKERD" ] && [ -z "${KEEP_DOCKERD:-}" ]; then
    log "stopping the Docker engine this script started (pid $STARTED_DOCKERD)"
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.2; done
  fi
  exit $rc
}
trap cleanup EXIT

if ! dk info >/dev/null 2>&1; then
  log "no Docker engine answers: starting dockerd (log in .local/compose-test/dockerd.log)"
  [ "$(id -u)" = 0 ] || die "no Docker engine answers, and starting one needs root"
  nohup /usr/sbin/dockerd >"$STATE/dockerd.log" 2>&1 </dev/null &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 150); do dk info >/dev/null 2>&1 && break; sleep 0.2; done
  dk info >/dev/null 2>&1 || die "dockerd did not come up (see $STATE/dockerd.log)"
fi
stage_done "engine ready"

# --- base image --------------------------------------------------------------------------------
if dk image inspect debian:bookworm-slim >/dev/null 2>&1 || dk pull -q debian:bookworm-slim >/dev/null 2>&1; then
  BASE=debian:bookworm-slim
else
  BASE=$LOCAL_BASE
  if ! dk image inspect "$BASE" >/dev/null 2>&1; then
    log "no registry: building $BASE with debootstrap from $DEBIAN_MIRROR (once, cached)"
    rootfs="$STATE/rootfs"
    as_root rm -rf "$rootfs"
    as_root debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$STATE/debootstrap.log" 2>&1 ||
      die "debootstrap failed (see $STATE/debootstrap.log)"
    # Slim it the way debian:*-slim is: no docs, man pages or translations, now or from later
    # installs, and apt keeps no downloaded packages or caches in the layers built on it.
    as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
      "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
      "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
      'path-exclude /usr/share/locale/*' | as_root tee "$rootfs/etc/dpkg/dpkg.cfg.d/docker" >/dev/null
    printf '%s\n' \
      'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
      'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
      'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' 'Acquire::Languages "none";' \
      | as_root tee "$rootfs/etc/apt/apt.conf.d/docker-clean" >/dev/null
    as_root tar -C "$rootfs" --numeric-owner -c . | dk import --change 'CMD ["bash"]' - "$BASE" >/dev/null
    as_root rm -rf "$rootfs"
  fi
fi
log "base image: $BASE"
stage_done "base image ($BASE)"

# --- stand-ins for mongo:7 and redis:7 ---------------------------------------------------------
SECANTUS="$(command -v secantusd-rs || true)"
if [ -z "$SECANTUS" ]; then
  build/local-services.sh up >/dev/null
  SECANTUS="$(command -v secantusd-rs || true)"
fi
[ -n "$SECANTUS" ] || die "secantusd-rs is not installed (build/local-services.sh up installs it)"
ctx="$STATE/ctx"
rm -rf "$ctx" && mkdir -p "$ctx/mongo" "$ctx/redis"
cp "$SECANTUS" "$ctx/mongo/secantusd-rs"
cp build/compose-test/redis-entrypoint.sh "$ctx/redis/"
DOCKER_BUILDKIT=1 dk build -q --build-arg BASE_IMAGE="$BASE" -f build/compose-test/secantus.Dockerfile \
  -t "$MONGO_IMAGE" "$ctx/mongo" >/dev/null
DOCKER_BUILDKIT=1 dk build -q --build-arg BASE_IMAGE="$BASE" -f build/compose-test/redis.Dockerfile \
  -t "$REDIS_IMAGE" "$ctx/redis" >/dev/null
stage_done "mongo and redis stand-ins"

# --- Herald's image ----------------------------------------------------------------------------
log "building herald (release) and $HERALD_IMAGE from build/Dockerfile"
cargo build --quiet --release --locked --bin herald
install -D -m 755 -s target/release/herald target/docker/herald
stage_done "release build of herald"
DOCKER_BUILDKIT=1 dk build -q -f build/Dockerfile --build-arg HERALD_BUILD=prebuilt \
  --build-arg RUNTIME_IMAGE="$BASE" -t "$HERALD_IMAGE" . >/dev/null
IMAGE_BYTES="$(dk image inspect "$HERALD_IMAGE" --format '{{.Size}}')"
stage_done "image build"

# --- up ----------------------------------------------------------------------------------------
for port in 3000 3001 8090; do
  port_open $port && die "127.0.0.1:$port is taken; the compose stack publishes 3000, 3001 and 8090"
done
compose down -v --remove-orphans >/dev/null 2>&1 || true
COMPOSE_UP=1
log "docker-compose up (project $PROJECT)"
timeout "$TIMEOUT" docker-compose -p "$PROJECT" -f docker-compose.yml -f "$OVERRIDE" up -d --no-build \
  >"$STATE/up.log" 2>&1 || { cat "$STATE/up.log" >&2; die "docker-compose up did not finish"; }

container() { dk ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1"; }
health() { dk inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$(container "$1")"; }

for service in mongo redis webhook-sink messenger-api job-scheduler; do
  deadline=$((SECONDS + TIMEOUT))
  until [ "$(health $service)" = healthy ]; do
    [ $SECONDS -lt $deadline ] || die "$service is $(health $service), not healthy"
    sleep 1
  done
  log "$service is healthy"
done
stage_done "up until every service is healthy"

doctor="$(container doctor)"
[ -n "$doctor" ] || die "the doctor container was never created"
doctor_rc="$(dk inspect --format '{{.State.ExitCode}}' "$doctor")"
[ "$doctor_rc" = 0 ] || die "herald doctor exited with $doctor_rc: $(dk logs "$doctor" 2>&1 | tail -n 20)"
log "herald doctor passed: $(dk logs "$doctor" 2>&1 | tail -n 1)"
seed="$(container seed)"
[ -n "$seed" ] || die "the seed container was never created"
deadline=$((SECONDS + TIMEOUT))
until [ "$(dk inspect --format '{{.State.Status}}' "$seed")" = exited ]; do
  [ $SECONDS -lt $deadline ] || die "the seed is still running"
  sleep 1
done
seed_rc="$(dk inspect --format '{{.State.ExitCode}}' "$seed")"
[ "$seed_rc" = 0 ] || die "the seed exited with $seed_rc"
log "the seed completed (exit 0)"

# The scheduler starts once the seed has completed and runs at once (run_on_start): the first
# batch reaches the sink container, and the API marks those messages sent.
stats() { curl -fsS -H "Authorization: Bearer $API_KEY" http://127.0.0.1:3000/api/messenger/stats; }
deadline=$((SECONDS + TIMEOUT))
while :; do
  delivered="$(curl -fsS http://127.0.0.1:8090/webhook-sink/received/count | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')"
  sent="$(stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["counts"]["sent"])')"
  [ "$delivered" -ge 2 ] && [ "$sent" -ge 2 ] && break
  [ $SECONDS -lt $deadline ] || die "the sink holds $delivered messages and the API counts $sent sent"
  sleep 1
done
log "delivered to the sink container: $delivered; sent by the API's count: $sent"
stage_done "seed done, first messages delivered"

NEWMAN="$(build/newman-bin.sh)"
"$NEWMAN" run postman/herald.postman_collection.json -e postman/docker.postman_environment.json \
  --bail --color off --reporters cli >"$STATE/newman.log" 2>&1 ||
  { cat "$STATE/newman.log" >&2; die "the Postman collection failed against the compose stack"; }
grep -E '│ +(requests|assertions) ' "$STATE/newman.log" >&2 || true
stage_done "Postman collection (docker env)"

# --- down --------------------------------------------------------------------------------------
compose down -v --remove-orphans --timeout 20 >/dev/null 2>&1
COMPOSE_UP=
left="$(dk ps -aq --filter "label=com.docker.compose.project=$PROJECT")"
left+="$(dk network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
left+="$(dk volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"
[ -z "$left" ] || die "down -v left these behind: $left"
stage_done "down -v, nothing left behind"

log "green. Herald's runtime image $HERALD_IMAGE (on $BASE): $((IMAGE_BYTES / 1024 / 1024)) MiB"
printf '[compose-up-test]   %s\n' "${TIMES[@]}" >&2
log "total $SECONDS s"
