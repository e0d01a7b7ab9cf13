#!/usr/bin/env bash
# Make sure a redis-server binary exists for bench/service_bench.py (the Redis MGET baseline).
# Debian/Ubuntu: installs the distribution package when missing. Idempotent.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server: $(redis-server --version | head -n 1)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing and apt-get is not available; install Redis and retry" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq redis-server >/dev/null
echo "redis-server: $(redis-server --version | head -n 1)"
