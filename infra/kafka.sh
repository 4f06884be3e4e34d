#!/usr/bin/env bash
# Start, health-check or stop the local kafka that reloop uses (idempotent; stops only what it started, by pid).
# Usage: infra/kafka.sh {start|stop|status}
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m reloop.services "${1:-status}" kafka
