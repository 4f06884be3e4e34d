#!/usr/bin/env bash
# Set up (idempotently), start the real services the tests need, run the whole suite, stop what we started.
# Usage: scripts/test.sh [pytest args...]     (what `make test` and .ci/run call)
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
export PATH="$PWD/.venv/bin:$PATH"
# lint, the layer contracts and types first: they take seconds and fail loudly
scripts/check.sh || exit 1
export PYTHONWARNINGS=ignore::DeprecationWarning

started=()
for svc in kafka redis ray; do
  if ! python -m reloop.services status "$svc" >/dev/null 2>&1; then
    python -m reloop.services start "$svc" || { echo "could not start $svc" >&2; exit 1; }
    started+=("$svc")
  fi
done
cleanup() {
  for svc in "${started[@]}"; do python -m reloop.services stop "$svc"; done
}
trap cleanup EXIT INT TERM

# The cluster tests change process-wide Ray state (token auth is read once per process when Ray's core
# library loads; embedded Ray's single-machine switch is a process constant), so without arguments they
# run in a pytest process of their own, after the rest.
CLUSTER=(tests/test_cluster_profile.py tests/test_cluster_ray.py tests/test_s3_storage.py)
if [ $# -eq 0 ]; then
  python -m pytest $(printf -- '--ignore=%s ' "${CLUSTER[@]}")
  code=$?
  python -m pytest "${CLUSTER[@]}"
  code2=$?
  [ $code -eq 0 ] && code=$code2
else
  python -m pytest "$@"
  code=$?
fi
# pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass
if [ $code -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit $code
