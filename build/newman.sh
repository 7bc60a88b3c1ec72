#!/usr/bin/env bash
# Runs the Postman collection with newman against a live stack started by the project's own
# scripts: local MongoDB/Redis, then the sink, Messenger API and Job Scheduler on spare ports
# with a fresh database and Redis prefix. Everything it starts is stopped at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

build/local-services.sh up
cargo build --quiet --bin herald
HERALD=target/debug/herald

NEWMAN_DIR="$ROOT/.local/newman"
NEWMAN="$NEWMAN_DIR/node_modules/.bin/newman"
if [ ! -x "$NEWMAN" ]; then
  echo "[newman] installing newman 6 from npm into .local/newman"
  npm install --prefix "$NEWMAN_DIR" --no-audit --no-fund --silent newman@6 >/dev/null
fi

run_id="$(date +%s)$$"
export HERALD_ENV=local
export HERALD__MONGO__DATABASE="herald_newman_$run_id"
export HERALD__REDIS__KEY_PREFIX="herald-newman:$run_id:"
export HERALD__MESSENGER_API__PORT=3100 HERALD__MESSENGER_API__URL=http://127.0.0.1:3100
export HERALD__JOB_SCHEDULER__PORT=3101 HERALD__JOB_SCHEDULER__URL=http://127.0.0.1:3101
export HERALD__WEBHOOK_SINK__PORT=8190 HERALD__WEBHOOK__URL=http://127.0.0.1:8190/webhook

mkdir -p .local
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap stop EXIT
"$HERALD" webhook-sink >.local/newman-sink.log 2>&1 & pids+=($!)
"$HERALD" messenger-api >.local/newman-api.log 2>&1 & pids+=($!)
"$HERALD" job-scheduler >.local/newman-scheduler.log 2>&1 & pids+=($!)
for url in http://127.0.0.1:3100/messenger/health http://127.0.0.1:3101/job-scheduler/health http://127.0.0.1:8190/webhook-sink/health; do
  for _ in $(seq 1 100); do curl -fsS "$url" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -fsS "$url" >/dev/null || { echo "[newman] $url never became healthy (see .local/newman-*.log)" >&2; exit 1; }
done

"$NEWMAN" run postman/herald.postman_collection.json \
  -e postman/local.postman_environment.json \
  --env-var apiUrl=http://127.0.0.1:3100 \
  --env-var schedulerUrl=http://127.0.0.1:3101 \
  --bail --color off --reporters cli
