"""The cluster profile end to end: ``reloop run --profile cluster`` (feature job on the Flink job server with
parallelism 2, Feast online store on Redis, the trainer and retrain on a two-node Ray, storage on s3proxy)
against the embedded profile on the same 20k-event stream.

- every stage's counts are equal between the two profiles (replayed = consumed = featurised = examples
  written = learned);
- the cluster run's examples, registry and trainer checkpoints are in the bucket and none of them under the
  local run directory;
- a retrain ran and Ray placed its 2 workers on 2 node ids;
- Redis holds the online features, equal to SQLite's for the same events.

Both runs are ``reloop run`` processes (the Ray token and S3 settings must be in the environment before Ray
loads, as for a user). Their wall time and per-stage throughput are printed for the note.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from reloop import services

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
EVENTS = 20_000
ARGS = ["--limit", str(EVENTS), "--inject-drift", "abrupt_ctr", "--drift-at", "0.5", "--retrain-min-rows", "2000",
        "--quiet", "--feature-every", "2"]


def run_cli(tmp_path: Path, name: str, *args: str) -> dict:
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"  # run ids name Kafka topics and bucket prefixes: unique
    proc = subprocess.run(
        [sys.executable, "-m", "reloop.cli", "run", *ARGS, "--run-id", run_id, "--reports",
         str(tmp_path / "reports"), "--state-dir", str(tmp_path / "runs"), *args],
        capture_output=True, text=True, timeout=2400, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "reports" / run_id / "summary.json").read_text())
    summary["state"] = tmp_path / "runs" / run_id
    return summary


def feature_repo(tmp: Path, name: str) -> Path:
    """A fresh copy of the Feast repo, so each profile's online store holds only this test's events."""
    repo = tmp / name
    repo.mkdir()
    for f in ("feature_repo.py", "feature_store.yaml", "feature_store.redis.yaml"):
        shutil.copy(REPO / "features" / f, repo / f)
    return repo


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profiles")
    sqlite_repo, redis_repo = feature_repo(tmp, "features_sqlite"), feature_repo(tmp, "features_redis")
    (tmp / "embedded.yaml").write_text(yaml.safe_dump({"feast": {"repo_path": str(sqlite_repo)}}))
    cluster_cfg = yaml.safe_load((REPO / "infra" / "cluster.yaml").read_text())
    cluster_cfg["feast"]["repo_path"] = str(redis_repo)
    (tmp / "cluster.yaml").write_text(yaml.safe_dump(cluster_cfg))
    embedded = run_cli(tmp, "embedded", "--config", str(tmp / "embedded.yaml"))
    cluster = run_cli(tmp, "cluster", "--profile", "cluster", "--config", str(tmp / "cluster.yaml"))
    for s in (embedded, cluster):
        print(f"\n[{s['run_id']}] wall {s['seconds']:.1f}s events/s {json.dumps(s['throughput_events_per_s'])}")
    embedded["feast_repo"], cluster["feast_repo"] = sqlite_repo, redis_repo
    return embedded, cluster


def stage_counts(summary: dict) -> dict:
    c = summary["counts"]
    return {k: c[k] for k in ("events in dataset", "replayed", "consumed", "committed offsets", "parsed",
                              "dead-lettered", "featurised (accepted)", "late", "duplicates", "examples written",
                              "examples learned")}


def test_counts_equal_the_embedded_run(runs):
    embedded, cluster = runs
    assert stage_counts(cluster) == stage_counts(embedded)
    c = cluster["counts"]
    assert c["replayed"] == c["consumed"] == c["featurised (accepted)"] == c["examples written"] == \
        c["examples learned"] == EVENTS
    assert cluster["errors"] == [] and embedded["errors"] == []


def test_storage_is_in_the_bucket_and_not_on_local_disk(runs):
    _, cluster = runs
    bucket = services.S3Proxy().dir / "data" / services.S3_BUCKET
    run_id = cluster["run_id"]
    for prefix in ("examples", "registry", "trainer", "feature_job"):
        d = bucket / prefix / "runs" / run_id
        assert d.is_dir() and any(p.is_file() for p in d.rglob("*")), f"nothing under s3://reloop/{prefix}/..."
    assert list((bucket / "examples" / "runs" / run_id).rglob("*.parquet"))
    assert (bucket / "trainer" / "runs" / run_id / "trainer" / "LATEST").is_file()
    assert (bucket / "registry" / "runs" / run_id / "registry" / "CURRENT").is_file()
    local = cluster["state"]
    for name in ("examples", "registry", "trainer", "feature_state", "ray_train"):
        assert not (local / name).exists(), f"{name} written to the local run directory"


def test_retrain_ran_on_two_nodes(runs):
    _, cluster = runs
    fitted = [e for e in cluster["deployer"] if e["what"] == "retrain fitted"]
    assert fitted, f"no retrain finished: {cluster['deployer']}"
    assert all(len(set(e["worker_nodes"])) == 2 for e in fitted), fitted


def test_redis_holds_the_same_online_features_as_sqlite(runs):
    embedded, cluster = runs
    from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES
    from pipelines.config import FeastConfig
    from pipelines.feast_io import ITEM_VIEW, USER_VIEW, open_store
    from reloop.datasets import load_dataset

    events = load_dataset("movielens-100k", limit=EVENTS)
    sqlite = open_store(FeastConfig(profile="sqlite", repo_path=str(embedded["feast_repo"])))
    redis = open_store(FeastConfig(profile="redis", repo_path=str(cluster["feast_repo"]),
                                   redis_connection_string=services.REDIS_URL))
    for key, view, names in (("user_id", USER_VIEW, USER_FEATURES), ("item_id", ITEM_VIEW, ITEM_FEATURES)):
        ids = sorted(set(events[key].to_pylist()))
        rows = [{key: i} for i in ids]
        feats = [f"{view}:{n}" for n in names]
        a = sqlite.get_online_features(features=feats, entity_rows=rows).to_dict()
        b = redis.get_online_features(features=feats, entity_rows=rows).to_dict()
        assert len(a[key]) == len(ids)
        for n in names:
            assert a[n] == b[n], f"{view}:{n} differs between SQLite and Redis"
        assert sum(v is not None for v in b[names[0]]) == len(ids)
