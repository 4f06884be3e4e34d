#!/usr/bin/env bash
# The static checks of the repo (CONTRIBUTING.md): lint, the layer contracts, types.
# Usage: scripts/check.sh          (scripts/test.sh runs it before the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin
echo "[check] ruff (F, E, W, I, B, UP)";  $B/ruff check --quiet .
echo "[check] ruff format";  $B/ruff format --check --quiet .
echo "[check] import-linter (reloop > jobs > pipelines > features > online_models)"; $B/lint-imports --no-cache | tail -3
echo "[check] mypy (the typed modules of pyproject.toml)";  $B/mypy --no-error-summary
