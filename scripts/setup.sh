#!/usr/bin/env bash
# Idempotent set-up of everything reloop needs on a fresh machine:
#   - .venv with the Python dependencies (pyproject.toml) and the MovieLens wheel
#   - the Kafka jars from Maven Central (infra/kafka/pom.xml -> infra/kafka/lib)
#   - the Beam Flink job server jars (infra/flink/pom.xml -> infra/flink/lib)
#   - s3proxy, the S3 API of the cluster profile (infra/s3proxy/pom.xml -> infra/s3proxy/lib)
#   - redis-server from Debian's packages
# Re-running it is cheap: each step checks a stamp or the thing itself first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.reloop-deps
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing Python dependencies (torch comes from PyPI and is large; pip caches it)"
  .venv/bin/python -m pip install -q --upgrade pip wheel setuptools
  .venv/bin/python -m pip install -q -e ".[test]"
  # MovieLens-100K ships inside this wheel; its own dependencies conflict with ours, hence --no-deps.
  .venv/bin/python -m pip install -q --no-deps "recbole==1.2.1"
  echo "$want" > "$stamp"
else
  echo "[setup] Python dependencies up to date"
fi

if [ ! -f infra/kafka/lib/.complete ]; then
  echo "[setup] fetching Kafka jars from Maven Central"
  (cd infra/kafka && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=lib \
     && touch lib/.complete)
else
  echo "[setup] Kafka jars present"
fi

if [ ! -f infra/flink/lib/.complete ]; then
  echo "[setup] fetching the Beam Flink job server (Flink 1.19, embedded) from Maven Central"
  (cd infra/flink && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=lib \
     && touch lib/.complete)
else
  echo "[setup] Flink job server jars present"
fi
if [ ! -f infra/flink/expansion/lib/.complete ]; then
  echo "[setup] fetching Beam's Java KafkaIO expansion service and SDK harness (ReadFromKafka on Flink)"
  (cd infra/flink/expansion && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime \
     -DoutputDirectory=lib && touch lib/.complete)
else
  echo "[setup] KafkaIO expansion service jars present"
fi

if [ ! -f infra/s3proxy/lib/.complete ]; then
  echo "[setup] fetching s3proxy (S3 API over a local directory, for s3:// storage) from Maven Central"
  (cd infra/s3proxy && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=lib \
     && touch lib/.complete)
else
  echo "[setup] s3proxy jars present"
fi

if ! command -v redis-server >/dev/null; then
  echo "[setup] installing redis-server from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  # the package may start a system instance; reloop runs its own on another port
else
  echo "[setup] redis-server present"
fi
if [ "${RELOOP_SETUP_BROWSER:-1}" = 1 ] && ! command -v chromium >/dev/null; then
  # the report test opens report.html in a real headless browser (Debian's Chromium, driven by playwright)
  echo "[setup] installing chromium from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
echo "[setup] done"
