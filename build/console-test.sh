#!/usr/bin/env bash
# The operator console in a real headless Chromium (Debian's `chromium`, driven by
# `playwright-core` from npm; both installed here when missing) against a live stack on ports
# 3200/3201/8290 that sends every second. Screenshots go to .local/screenshots/ (ignored), or
# to $CONSOLE_SCREENSHOTS: `make screenshots` refreshes the README's pictures in docs/screenshots/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
source build/test-stack.sh

if ! command -v chromium >/dev/null; then
  echo "[console] installing chromium from the OS packages"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
export PLAYWRIGHT_DIR="$ROOT/.local/console-test"
if [ ! -d "$PLAYWRIGHT_DIR/node_modules/playwright-core" ]; then
  echo "[console] installing playwright-core from npm into .local/console-test"
  npm install --prefix "$PLAYWRIGHT_DIR" --no-audit --no-fund --silent playwright-core@1 >/dev/null
fi

export HERALD__JOB_SCHEDULER__SCHEDULE="*/1 * * * * *"
export HERALD__JOB_SCHEDULER__BATCH_SIZE=10
export HERALD__JOB_SCHEDULER__CONCURRENCY=4
# Status callbacks to the sink on loopback, signed: the sink checks them with the same secret.
export HERALD__CALLBACKS__ALLOWED_HOSTS=127.0.0.1
export HERALD__CALLBACKS__SECRET=whsec_Y29uc29sZS10ZXN0LWNhbGxiYWNrLXNlY3JldA==
export HERALD__CALLBACKS__POLL_MS=200
start_stack console 3200 3201 8290

export CONSOLE_API=http://127.0.0.1:3200 CONSOLE_SCHEDULER=http://127.0.0.1:3201 CONSOLE_SINK=http://127.0.0.1:8290
export CONSOLE_KEY=local-dev-api-key CONSOLE_SCREENSHOTS="${CONSOLE_SCREENSHOTS:-$ROOT/.local/screenshots}"
node --test --test-reporter=spec build/console.test.mjs
