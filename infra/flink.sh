#!/usr/bin/env bash
# Start, health-check or stop the local Beam Flink job server (embedded Flink 1.19, one JVM, bounded heap;
# idempotent; stops only what it started, by pid). Usage: infra/flink.sh {start|stop|status}
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m reloop.services "${1:-status}" flink
