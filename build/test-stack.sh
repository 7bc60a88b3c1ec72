# Sourced by every script that runs a live stack (run-local.sh, newman.sh, fuzz.sh,
# console-test.sh): starts the local MongoDB/Redis, builds herald, and runs the sink, the
# Messenger API and the Job Scheduler on the given ports. Everything it starts is stopped on exit.
#
#   start_stack NAME API_PORT SCHEDULER_PORT SINK_PORT
#
# Extra HERALD__* variables exported before the call reach all three processes; STACK_SINK_ARGS
# are extra flags of the sink. By default the stack gets a fresh database and Redis prefix;
# STACK_FRESH=0 keeps the configured ones (the local stack's `herald`). STACK_SEED=N seeds N mock
# messages before the scheduler starts.
# Logs go to .local/NAME-{sink,api,scheduler}.log.

start_stack() {
  local name=$1 api_port=$2 scheduler_port=$3 sink_port=$4
  build/local-services.sh up
  cargo build --quiet --bin herald
  HERALD=target/debug/herald

  export HERALD_ENV="${HERALD_ENV:-local}"
  if [ "${STACK_FRESH:-1}" = 1 ]; then
    local run_id
    run_id="$(date +%s)$$"
    export HERALD__MONGO__DATABASE="herald_${name}_$run_id"
    export HERALD__REDIS__KEY_PREFIX="herald-$name:$run_id:"
  fi
  export HERALD__MESSENGER_API__PORT=$api_port HERALD__MESSENGER_API__URL=http://127.0.0.1:$api_port
  export HERALD__JOB_SCHEDULER__PORT=$scheduler_port HERALD__JOB_SCHEDULER__URL=http://127.0.0.1:$scheduler_port
  export HERALD__WEBHOOK_SINK__PORT=$sink_port HERALD__WEBHOOK__URL=http://127.0.0.1:$sink_port/webhook

  mkdir -p .local
  STACK_PIDS=()
  trap stop_stack EXIT
  # shellcheck disable=SC2086 # STACK_SINK_ARGS is a list of flags
  "$HERALD" webhook-sink ${STACK_SINK_ARGS:-} >".local/$name-sink.log" 2>&1 & STACK_PIDS+=($!)
  "$HERALD" messenger-api >".local/$name-api.log" 2>&1 & STACK_PIDS+=($!)
  wait_healthy "$name" "http://127.0.0.1:$sink_port/webhook-sink/health"
  wait_healthy "$name" "http://127.0.0.1:$api_port/messenger/health"
  if [ "${STACK_SEED:-0}" -gt 0 ]; then
    "$HERALD" seed --count "$STACK_SEED"
  fi
  "$HERALD" job-scheduler >".local/$name-scheduler.log" 2>&1 & STACK_PIDS+=($!)
  wait_healthy "$name" "http://127.0.0.1:$scheduler_port/job-scheduler/health"
}

wait_healthy() { # name url
  for _ in $(seq 1 100); do curl -fsS "$2" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "[$1] $2 never became healthy (see .local/$1-*.log)" >&2
  exit 1
}

stop_stack() {
  trap - EXIT
  kill -TERM "${STACK_PIDS[@]}" 2>/dev/null || true
  wait "${STACK_PIDS[@]}" 2>/dev/null || true
}
