#!/usr/bin/env bash
# Makes MongoDB and Redis available on loopback for local runs and tests. Idempotent.
#
#   build/local-services.sh up       start what is missing (installing it when needed)
#   build/local-services.sh down     stop what this script started
#   build/local-services.sh status   say what answers
#
# MongoDB: a server already answering on MONGO_PORT (a configured mongod) wins; else a
# `mongod` on PATH; else the MongoDB-wire-compatible SecantusDB server `secantusd-rs`
# (installed with cmake + cargo when missing), falling back to `secantusd-py` (pip).
# Redis: one already answering on REDIS_PORT wins; else `redis-server` (from apt when missing).
# HAProxy (the balancer test starts its own) and redis-server/redis-cli (the Sentinel and
# Cluster tests start their own) are installed from apt when missing.
# Data and logs live under .local/ (git-ignored).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.local"
MONGO_PORT="${MONGO_PORT:-27017}"
REDIS_PORT="${REDIS_PORT:-6379}"
SECANTUS_VERSION="0.5.3-beta.196"
SECANTUS_PY_VERSION="0.7.0b3"
export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[local-services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  log "$2 did not come up on 127.0.0.1:$1 (see $STATE/*.log)"
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  log "installing $* from the OS packages"
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

install_secantus() {
  command -v secantusd-rs >/dev/null && return 0
  command -v cmake >/dev/null || apt_install cmake
  log "installing secantusd-rs $SECANTUS_VERSION with cargo (about 5 minutes, once)"
  if cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version >"$STATE/secantus-install.log" 2>&1; then
    return 0
  fi
  log "cargo install failed (see $STATE/secantus-install.log); trying secantusd-py from PyPI"
  python3 -m pip install --quiet "SecantusDB==$SECANTUS_PY_VERSION"
}

mongo_up() {
  if port_open "$MONGO_PORT"; then
    log "MongoDB already answers on 127.0.0.1:$MONGO_PORT"
    return 0
  fi
  mkdir -p "$STATE/mongo"
  if command -v mongod >/dev/null; then
    log "starting mongod on 127.0.0.1:$MONGO_PORT"
    mongod --bind_ip 127.0.0.1 --port "$MONGO_PORT" --dbpath "$STATE/mongo" --logpath "$STATE/mongod.log" \
      --fork --pidfilepath "$STATE/mongo.pid" >/dev/null
  else
    install_secantus
    local server=secantusd-rs
    command -v secantusd-rs >/dev/null || server=secantusd-py
    log "starting $server on 127.0.0.1:$MONGO_PORT (data in .local/mongo)"
    nohup "$server" --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$STATE/mongo" \
      >"$STATE/mongo.log" 2>&1 </dev/null &
    echo $! >"$STATE/mongo.pid"
  fi
  wait_port "$MONGO_PORT" MongoDB 60
}

redis_up() {
  if port_open "$REDIS_PORT"; then
    log "Redis already answers on 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$STATE/redis"
  log "starting redis-server on 127.0.0.1:$REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STATE/redis" --logfile "$STATE/redis.log" --pidfile "$STATE/redis.pid"
  wait_port "$REDIS_PORT" Redis 20
}

stop_pidfile() { # name file
  if [ -f "$2" ]; then
    local pid
    pid="$(cat "$2")"
    if kill "$pid" 2>/dev/null; then log "stopped $1 (pid $pid)"; fi
    rm -f "$2"
  fi
}

case "${1:-}" in
  up)
    mkdir -p "$STATE"
    mongo_up
    redis_up
    # The balancer test runs HAProxy in front of two API processes (it starts its own).
    command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || apt_install haproxy
    # The Redis Sentinel and Cluster tests start their own redis-server processes and create
    # the cluster with redis-cli, whoever runs the shared Redis.
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_install redis-server redis-tools
    log "ready: mongodb://127.0.0.1:$MONGO_PORT  redis://127.0.0.1:$REDIS_PORT"
    ;;
  down)
    stop_pidfile MongoDB "$STATE/mongo.pid"
    stop_pidfile Redis "$STATE/redis.pid"
    ;;
  status)
    for pair in "MongoDB:$MONGO_PORT" "Redis:$REDIS_PORT"; do
      if port_open "${pair#*:}"; then log "${pair%%:*} answers on 127.0.0.1:${pair#*:}"; else log "${pair%%:*} is down"; fi
    done
    ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
