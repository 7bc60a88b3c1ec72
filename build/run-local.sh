#!/usr/bin/env bash
# The whole local stack: MongoDB + Redis, the webhook sink, the Messenger API, 10 mock
# messages and the Job Scheduler. Ctrl-C stops everything it started.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
export HERALD_ENV="${HERALD_ENV:-local}"

build/local-services.sh up
cargo build --quiet --bin herald
HERALD=target/debug/herald

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping Herald..."
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

wait_healthy() { # url name
  for _ in $(seq 1 100); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "$2 did not become healthy at $1" >&2
  exit 1
}

mkdir -p .local
"$HERALD" webhook-sink >.local/webhook-sink.log 2>&1 & pids+=($!)
"$HERALD" messenger-api >.local/messenger-api.log 2>&1 & pids+=($!)
wait_healthy http://127.0.0.1:8090/webhook-sink/health "webhook sink"
wait_healthy http://127.0.0.1:3000/messenger/health "Messenger API"
"$HERALD" seed --count 10
"$HERALD" job-scheduler >.local/job-scheduler.log 2>&1 & pids+=($!)
wait_healthy http://127.0.0.1:3001/job-scheduler/health "Job Scheduler"

cat <<TXT

Herald is running (logs in .local/*.log). API key for "Authorize": local-dev-api-key

  Operator console:          http://127.0.0.1:3000/messenger/console
  Messenger API Swagger UI:  http://127.0.0.1:3000/messenger/swagger
  Job Scheduler Swagger UI:  http://127.0.0.1:3001/job-scheduler/swagger
  Live events (SSE):         curl -N -H 'Authorization: Bearer local-dev-api-key' http://127.0.0.1:3000/api/messenger/events
  Sent messages:             curl -H 'Authorization: Bearer local-dev-api-key' http://127.0.0.1:3000/api/messenger/messages/sent
  What the provider got:     http://127.0.0.1:8090/webhook-sink/received
  Metrics:                   http://127.0.0.1:3000/metrics  http://127.0.0.1:3001/metrics

The job sends two messages every two minutes (the first two at once). Ctrl-C stops everything.
TXT
wait "${pids[@]}"
