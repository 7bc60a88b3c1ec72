#!/usr/bin/env bash
# Validates docker-compose.yml without a Docker engine (Debian's docker-compose can `config`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v docker-compose >/dev/null; then
  echo "[compose] installing docker-compose from the OS packages"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >/dev/null
fi
docker-compose -f docker-compose.yml config --quiet
echo "[compose] docker-compose.yml is valid"
