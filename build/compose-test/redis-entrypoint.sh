#!/bin/sh
# Like the official image: a redis-server started without a config file listens on every
# interface of the container with protected mode off (the compose network is the boundary).
set -e
if [ "$1" = "redis-server" ]; then
  shift
  exec redis-server --bind 0.0.0.0 --protected-mode no "$@"
fi
exec "$@"
