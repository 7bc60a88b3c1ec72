#!/usr/bin/env bash
# Runs the Postman collection with newman against a live stack started by the project's own
# scripts (build/test-stack.sh) on ports 3100/3101/8190. Everything it starts is stopped at the end.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
source build/test-stack.sh

NEWMAN="$(build/newman-bin.sh)"

start_stack newman 3100 3101 8190

"$NEWMAN" run postman/herald.postman_collection.json \
  -e postman/local.postman_environment.json \
  --env-var apiUrl=http://127.0.0.1:3100 \
  --env-var schedulerUrl=http://127.0.0.1:3101 \
  --env-var callbackUrl=http://127.0.0.1:8190/webhook-sink/callbacks \
  --bail --color off --reporters cli
