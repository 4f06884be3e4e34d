#!/usr/bin/env bash
# Start, health-check or stop the local ray that reloop uses (idempotent; stops only what it started, by pid).
# Usage: infra/ray.sh {start|stop|status}
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m reloop.services "${1:-status}" ray
