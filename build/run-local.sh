#!/usr/bin/env bash
# The whole local stack: MongoDB + Redis, the webhook sink, the Messenger API, 10 mock
# messages and the Job Scheduler, on the default ports and the `herald` database. Ctrl-C stops
# everything it started.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
source build/test-stack.sh

# The sink reports every message it accepts delivered (1 in 20 undelivered), as a provider would.
STACK_SINK_ARGS="--receipts-url http://127.0.0.1:3000/api/messenger/receipts/default --receipts-undelivered 0.05" \
  STACK_FRESH=0 STACK_SEED=10 start_stack local 3000 3001 8090
trap 'echo; echo "stopping Herald..."; stop_stack' INT TERM EXIT

cat <<TXT

Herald is running (logs in .local/local-*.log). API key for "Authorize": local-dev-api-key

  Operator console:          http://127.0.0.1:3000/messenger/console
  Messenger API Swagger UI:  http://127.0.0.1:3000/messenger/swagger
  Job Scheduler Swagger UI:  http://127.0.0.1:3001/job-scheduler/swagger
  Live events (SSE):         curl -N -H 'Authorization: Bearer local-dev-api-key' http://127.0.0.1:3000/api/messenger/events
  Sent messages:             curl -H 'Authorization: Bearer local-dev-api-key' http://127.0.0.1:3000/api/messenger/messages/sent
  What the provider got:     http://127.0.0.1:8090/webhook-sink/received
  Callbacks it took:         http://127.0.0.1:8090/webhook-sink/callbacks  (create with
                             "callbackUrl": "http://127.0.0.1:8090/webhook-sink/callbacks")
  Metrics:                   http://127.0.0.1:3000/metrics  http://127.0.0.1:3001/metrics

The job sends two messages every two minutes (the first two at once). Ctrl-C stops everything.
TXT
wait "${STACK_PIDS[@]}"
