# Sourced by the scripts that test a live stack (newman.sh, console-test.sh): starts the local
# MongoDB/Redis, builds herald, and runs the sink, the Messenger API and the Job Scheduler on the
# given ports with a fresh database and Redis prefix. Everything it starts is stopped on exit.
#
#   start_stack NAME API_PORT SCHEDULER_PORT SINK_PORT
#
# Extra HERALD__* variables exported before the call reach all three processes.

start_stack() {
  local name=$1 api_port=$2 scheduler_port=$3 sink_port=$4
  build/local-services.sh up
  cargo build --quiet --bin herald
  HERALD=target/debug/herald

  local run_id
  run_id="$(date +%s)$$"
  export HERALD_ENV=local
  export HERALD__MONGO__DATABASE="herald_${name}_$run_id"
  export HERALD__REDIS__KEY_PREFIX="herald-$name:$run_id:"
  export HERALD__MESSENGER_API__PORT=$api_port HERALD__MESSENGER_API__URL=http://127.0.0.1:$api_port
  export HERALD__JOB_SCHEDULER__PORT=$scheduler_port HERALD__JOB_SCHEDULER__URL=http://127.0.0.1:$scheduler_port
  export HERALD__WEBHOOK_SINK__PORT=$sink_port HERALD__WEBHOOK__URL=http://127.0.0.1:$sink_port/webhook

  mkdir -p .local
  STACK_PIDS=()
  trap stop_stack EXIT
  "$HERALD" webhook-sink >".local/$name-sink.log" 2>&1 & STACK_PIDS+=($!)
  "$HERALD" messenger-api >".local/$name-api.log" 2>&1 & STACK_PIDS+=($!)
  "$HERALD" job-scheduler >".local/$name-scheduler.log" 2>&1 & STACK_PIDS+=($!)
  local url
  for url in "http://127.0.0.1:$api_port/messenger/health" "http://127.0.0.1:$scheduler_port/job-scheduler/health" \
             "http://127.0.0.1:$sink_port/webhook-sink/health"; do
    for _ in $(seq 1 100); do curl -fsS "$url" >/dev/null 2>&1 && break; sleep 0.2; done
    curl -fsS "$url" >/dev/null || { echo "[$name] $url never became healthy (see .local/$name-*.log)" >&2; exit 1; }
  done
}

stop_stack() {
  kill -TERM "${STACK_PIDS[@]}" 2>/dev/null || true
  wait "${STACK_PIDS[@]}" 2>/dev/null || true
}
