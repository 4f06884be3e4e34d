#!/usr/bin/env bash
# Start, health-check or stop the local redis that reloop uses (idempotent; stops only what it started, by pid).
# Usage: infra/redis.sh {start|stop|status}
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m reloop.services "${1:-status}" redis
