#!/usr/bin/env bash
# `make fuzz` (part of `make test`): schemathesis against both APIs' own OpenAPI documents, on a
# live stack started by build/test-stack.sh (ports 3300/3301/8290, fresh database and Redis
# prefix), with the bearer key. Bounded: FUZZ_EXAMPLES generated cases per operation (default 100)
# and a seed printed for replay. Fails on any 5xx, a response outside the documented statuses,
# content types or schemas, a 405 without `Allow`, or an error body other than
# {status, internalCode, message} (build/fuzz/herald_checks.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
source build/test-stack.sh

VENV="$ROOT/.local/schemathesis-venv"
ST="$VENV/bin/schemathesis"
SCHEMATHESIS_VERSION=4.32.5
if [ ! -x "$ST" ] || ! "$ST" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  echo "[fuzz] installing schemathesis $SCHEMATHESIS_VERSION from PyPI into .local/schemathesis-venv"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

KEY=fuzz-api-key
READ_ONLY_KEY=fuzz-read-only-key
export HERALD__AUTH__API_KEYS=$KEY
# A configuration folder with one more key that may only read ([[auth.keys]] are tables, which
# environment variables cannot carry); plaintext keys are accepted in the local environment.
CONFIG_DIR="$ROOT/.local/fuzz-configs"
rm -rf "$CONFIG_DIR" && cp -r "$ROOT/configs" "$CONFIG_DIR"
cat >>"$CONFIG_DIR/local.toml" <<TOML

[[auth.keys]]
name = "fuzz-read-only"
key = "$READ_ONLY_KEY"
scopes = ["messages:read", "metrics"]
TOML
export HERALD_CONFIG_DIR="$CONFIG_DIR"
start_stack fuzz 3300 3301 8290

EXAMPLES="${FUZZ_EXAMPLES:-100}"
SEED="${FUZZ_SEED:-$RANDOM$RANDOM}"
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,unsupported_method,herald_error_body
export SCHEMATHESIS_HOOKS=herald_checks PYTHONPATH="$ROOT/build/fuzz"

fuzz() { # name url [extra args]; KEY and CHECKS as set around the call
  local name=$1 url=$2
  shift 2
  echo "[fuzz] $name: $url ($EXAMPLES cases per operation, seed $SEED)"
  # Run from .local/ so schemathesis keeps its cache (.schemathesis/) in the ignored folder. One
  # worker: with two, hypothesis parses lambda sources in two threads at once, which CPython
  # 3.11.7 can fail with "SystemError: AST constructor recursion depth mismatch" (a runtime
  # error of the tool, not a finding; fixed in later CPython releases).
  (cd .local && "$ST" run "$url" -H "Authorization: Bearer $KEY" --checks "$CHECKS" --max-examples "$EXAMPLES" \
    --seed "$SEED" --phases examples,coverage,fuzzing --workers 1 --no-color \
    --request-timeout 10 "$@") >".local/fuzz-$name.log" 2>&1 &&
    { grep -E "test cases|passed|generated" ".local/fuzz-$name.log" | tail -2; return 0; }
  cat ".local/fuzz-$name.log" >&2
  echo "[fuzz] $name: findings above (full log .local/fuzz-$name.log; replay with FUZZ_SEED=$SEED)" >&2
  return 1
}

status=0
# The live feed (SSE) streams until the client leaves; it has its own tests (live.rs).
fuzz messenger-api http://127.0.0.1:3300/messenger/openapi.json --exclude-path /api/messenger/events || status=1
fuzz job-scheduler http://127.0.0.1:3301/job-scheduler/openapi.json || status=1
# Once more with the read-only key: every write refused (403001), every read still answered.
KEY=$READ_ONLY_KEY CHECKS="$CHECKS,no_write_succeeds" EXAMPLES="${FUZZ_READ_ONLY_EXAMPLES:-25}" \
  fuzz messenger-api-read-only http://127.0.0.1:3300/messenger/openapi.json --exclude-path /api/messenger/events ||
  status=1
KEY=$READ_ONLY_KEY CHECKS="$CHECKS,no_write_succeeds" EXAMPLES="${FUZZ_READ_ONLY_EXAMPLES:-25}" \
  fuzz job-scheduler-read-only http://127.0.0.1:3301/job-scheduler/openapi.json || status=1
exit $status
