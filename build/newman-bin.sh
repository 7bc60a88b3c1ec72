#!/usr/bin/env bash
# Prints the path of the project's newman (6, from npm, kept in .local/newman), installing it once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NEWMAN_DIR="$ROOT/.local/newman"
NEWMAN="$NEWMAN_DIR/node_modules/.bin/newman"
if [ ! -x "$NEWMAN" ]; then
  echo "[newman] installing newman 6 from npm into .local/newman" >&2
  npm install --prefix "$NEWMAN_DIR" --no-audit --no-fund --silent newman@6 >/dev/null
fi
echo "$NEWMAN"
