"""The cluster profile end to end: ``reloop run --profile cluster`` (feature job on the Flink job server with
parallelism 2, Feast online store on Redis, the trainer and retrain on a two-node Ray, storage on s3proxy)
against the embedded profile on the same 20k-event stream.

- every stage's counts are equal between the two profiles (replayed = consumed = featurised = examples
  written = learned);
- the cluster run's examples, registry and trainer checkpoints are in the bucket and none of them under the
  local run directory;
- a retrain ran and Ray placed its 2 workers on 2 node ids;
- Redis holds the online features of every entity; for the same events in the same micro-batch, the
  feature job on Flink writes into Redis exactly what the local runner writes into SQLite.

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
ARGS = [
    "--limit",
    str(EVENTS),
    "--inject-drift",
    "abrupt_ctr",
    "--drift-at",
    "0.5",
    "--retrain-min-rows",
    "2000",
    "--quiet",
    "--feature-every",
    "2",
]


def run_cli(tmp_path: Path, name: str, *args: str) -> dict:
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"  # run ids name Kafka topics and bucket prefixes: unique
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reloop.cli",
            "run",
            *ARGS,
            "--run-id",
            run_id,
            "--reports",
            str(tmp_path / "reports"),
            "--state-dir",
            str(tmp_path / "runs"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=2400,
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
            "PYTHONPATH": str(REPO),
        },
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "reports" / run_id / "summary.json").read_text())
    summary["state"] = tmp_path / "runs" / run_id
    return summary


def feature_repo(tmp: Path, name: str) -> Path:
    """A fresh copy of the Feast repo, so each profile's online store holds only this test's events."""
    repo = tmp / name
    repo.mkdir()
    shutil.copy(REPO / "features" / "feature_repo.py", repo / "feature_repo.py")
    # a project of its own: Redis is shared by every run, and Feast skips a write whose event time is not
    # newer than what the store holds, so another run's rows for the same events would stay
    project = f"t{uuid.uuid4().hex[:10]}"
    for f in ("feature_store.yaml", "feature_store.redis.yaml"):
        text = (REPO / "features" / f).read_text()
        assert "\nproject: reloop\n" in text
        (repo / f).write_text(text.replace("\nproject: reloop\n", f"\nproject: {project}\n"))
    return repo


#: what ``--profile cluster`` starts (reloop.profiles.start_cluster_services), workers before the head
CLUSTER_SERVICES = ("flink", "s3", "ray-worker-1", "ray", "redis")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # the cluster run leaves the services its profile started up for the next run, as `reloop up` does; the
    # test stops (by pid) the ones that were down before it, so the suite leaves no JVM or Ray node behind
    was_up = {n for n in CLUSTER_SERVICES if services.get(n).status().running}
    try:
        yield _runs(tmp_path_factory)
    finally:
        for name in CLUSTER_SERVICES:
            if name not in was_up:
                services.get(name).stop()


def _runs(tmp_path_factory):
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
    return {
        k: c[k]
        for k in (
            "events in dataset",
            "replayed",
            "consumed",
            "committed offsets",
            "parsed",
            "dead-lettered",
            "featurised (accepted)",
            "late",
            "duplicates",
            "examples written",
            "examples learned",
        )
    }


def test_counts_equal_the_embedded_run(runs):
    embedded, cluster = runs
    assert stage_counts(cluster) == stage_counts(embedded)
    c = cluster["counts"]
    assert (
        c["replayed"]
        == c["consumed"]
        == c["featurised (accepted)"]
        == c["examples written"]
        == c["examples learned"]
        == EVENTS
    )
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


def online_features(store, events) -> dict:
    from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES
    from pipelines.feast_io import ITEM_VIEW, USER_VIEW

    out = {}
    for key, view, names in (("user_id", USER_VIEW, USER_FEATURES), ("item_id", ITEM_VIEW, ITEM_FEATURES)):
        ids = sorted(set(events[key].to_pylist()))
        got = store.get_online_features(
            features=[f"{view}:{n}" for n in names], entity_rows=[{key: i} for i in ids]
        ).to_dict()
        out.update({f"{view}:{n}": got[n] for n in names})
    return out


def test_redis_holds_the_online_features_of_every_entity(runs):
    """The cluster run's online store is Redis, with a row for every user and item of the stream. (Its values
    are not compared with the embedded run's SQLite: the two runs cut their micro-batches at different
    offsets, and windowed values are as of each micro-batch; the next test compares equal micro-batches.)"""
    from pipelines.config import FeastConfig
    from pipelines.feast_io import open_store
    from reloop.datasets import load_dataset

    _, cluster = runs
    events = load_dataset("movielens-100k", limit=EVENTS)
    redis = open_store(
        FeastConfig(profile="redis", repo_path=str(cluster["feast_repo"]), redis_connection_string=services.REDIS_URL)
    )
    got = online_features(redis, events)
    for name, values in got.items():
        assert values and all(v is not None for v in values), f"{name}: missing rows in Redis"
    embedded, _ = runs
    sqlite = online_features(open_store(FeastConfig(profile="sqlite", repo_path=str(embedded["feast_repo"]))), events)
    # for the note: how many rows differ between the two runs' stores (equal micro-batches: the next test)
    print({n: sum(a != b for a, b in zip(v, got[n])) for n, v in sqlite.items()})


def test_redis_on_flink_equals_sqlite_on_the_local_runner_for_the_same_events(tmp_path, kafka_config, unique_topic):
    """The same 20k events in one micro-batch each: the feature job on the Flink job server (parallelism 2)
    into Redis, and on Beam's local runner into SQLite; every online feature of every entity is equal."""
    from pipelines.config import FeastConfig, FeatureJobConfig, StorageConfig
    from pipelines.feast_io import open_store
    from pipelines.feature_job import run_once
    from reloop.config import ReloopConfig
    from reloop.datasets import load_dataset
    from reloop.replay import replay_table
    from reloop.runners import runner_args, start_local_flink

    services.get("redis").start()
    events = load_dataset("movielens-100k", limit=EVENTS)
    replay_table(events, kafka_config, topic=unique_topic, workers=1)
    stores = {}
    for profile, args in (("sqlite", None), ("redis", runner_args("flink", ["--parallelism=2"], start_local_flink))):
        repo = feature_repo(tmp_path, f"features_{profile}")
        k = kafka_config.model_copy(
            update={
                "events_topic": unique_topic,
                "dlq_topic": f"{unique_topic}.dlq",
                "consumer_group": f"{unique_topic}.{profile}",
            }
        )
        cfg = ReloopConfig(
            kafka=k,
            storage=StorageConfig(examples_uri=str(tmp_path / profile / "examples")),
            feature_job=FeatureJobConfig(state_uri=str(tmp_path / profile / "state")),
            feast=FeastConfig(profile=profile, repo_path=str(repo), redis_connection_string=services.REDIS_URL),
        )
        stats = run_once(cfg, topic=unique_topic, pipeline_args=args)
        assert stats.committed and stats.examples_written == EVENTS, (profile, stats)
        stores[profile] = online_features(open_store(cfg.feast), events)
    for name, want in stores["sqlite"].items():
        assert stores["redis"][name] == want, f"{name} differs between Redis (Flink) and SQLite (local runner)"
