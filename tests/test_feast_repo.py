"""The Feast repo in features/: declarations match the feature math, `feast apply` works, both profiles load."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.aggregates import DEFAULT_CONFIG, ITEM_FEATURES, USER_FEATURES

REPO = Path(__file__).resolve().parent.parent / "features"


def _copy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "features"
    repo.mkdir()
    for f in ("feature_repo.py", "feature_store.yaml", "feature_store.redis.yaml"):
        shutil.copy(REPO / f, repo / f)
    return repo


def test_feature_views_declare_exactly_the_computed_features():
    from pipelines.feast_io import repo_objects

    views = {o.name: o for o in repo_objects(REPO) if type(o).__name__ == "FeatureView"}
    assert [f.name for f in views["user_stats"].features] == USER_FEATURES + ["user_last_items"]
    assert [f.name for f in views["item_stats"].features] == ITEM_FEATURES
    assert DEFAULT_CONFIG.last_n > 0
    services = {o.name for o in repo_objects(REPO) if type(o).__name__ == "FeatureService"}
    assert {"ctr_lr_v1", "ctr_deepfm_v1", "ctr_dcnv2_v1"} <= services


def test_feast_cli_apply_in_a_copy_of_the_repo(tmp_path):
    repo = _copy_repo(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "feast.cli.cli", "-c", str(repo), "apply"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and "No module named feast.cli.cli" in proc.stderr:
        proc = subprocess.run(
            [shutil.which("feast") or "feast", "-c", str(repo), "apply"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "user_stats" in proc.stdout + proc.stderr
    assert (repo / "data" / "registry.db").exists() and (repo / "data" / "online_store.db").exists()


def test_online_write_then_read_round_trips_in_sqlite(tmp_path):
    import pyarrow as pa

    from pipelines.aggregates import FeatureState, compute_features, snapshot
    from pipelines.config import FeastConfig
    from pipelines.feast_io import apply_repo, offline_dir, open_store, write_snapshot
    from reloop.datasets import load_dataset

    cfg = FeastConfig(repo_path=str(_copy_repo(tmp_path)))
    apply_repo(cfg)
    store = open_store(cfg)
    _, state, _ = compute_features(load_dataset("movielens-100k", limit=2000), FeatureState.empty())
    users, items = snapshot(state, state.watermark + 1)
    for _ in range(2):  # idempotent: the same run twice leaves one offline file and the same online values
        write_snapshot(store, "user_stats", users, "run-a")
        write_snapshot(store, "item_stats", items, "run-a")
    assert [p.name for p in Path(offline_dir(store, "user_stats")).glob("*.parquet")] == ["part-run-a.parquet"]
    u = users.slice(0, 3).to_pylist()
    got = store.get_online_features(
        features=["user_stats:user_imp_all", "user_stats:user_last_items", "user_stats:user_ctr_7d"],
        entity_rows=[{"user_id": r["user_id"]} for r in u],
    ).to_dict()
    assert got["user_imp_all"] == [r["user_imp_all"] for r in u]
    assert got["user_last_items"] == [r["user_last_items"] for r in u]
    assert got["user_ctr_7d"] == pytest.approx([r["user_ctr_7d"] for r in u], abs=1e-12)
    # the duckdb offline store reads the run files and keeps entity rows without a match
    import pandas as pd

    ent = pd.DataFrame(
        {
            "user_id": [u[0]["user_id"], "nobody"],
            "event_timestamp": pd.to_datetime([state.watermark + 10] * 2, unit="ms", utc=True),
        }
    )
    hist = store.get_historical_features(entity_df=ent, features=["user_stats:user_imp_all"]).to_df()
    assert (
        len(hist) == 2 and int(hist.set_index("user_id").loc[u[0]["user_id"], "user_imp_all"]) == u[0]["user_imp_all"]
    )
    assert pa.__version__


def test_redis_profile_takes_the_connection_string_from_the_reloop_config(tmp_path):
    from pipelines.config import FeastConfig
    from pipelines.feast_io import open_store

    store = open_store(
        FeastConfig(profile="redis", repo_path=str(_copy_repo(tmp_path)), redis_connection_string="127.0.0.1:6399,db=3")
    )
    assert store.config.online_store.type == "redis"
    # the local service's generated password (when its state dir has one) is appended, never the config's own
    assert store.config.online_store.connection_string.split(",password=")[0] == "127.0.0.1:6399,db=3"


@pytest.mark.integration
def test_redis_profile_online_round_trip(tmp_path, redis_url):
    import uuid

    from pipelines.aggregates import FeatureState, compute_features, snapshot
    from pipelines.config import FeastConfig
    from pipelines.feast_io import apply_repo, open_store, write_snapshot

    repo = _copy_repo(tmp_path)
    # a project of its own, so parallel tests never read each other's keys in the shared Redis
    project = f"t{uuid.uuid4().hex[:10]}"
    for name in ("feature_store.yaml", "feature_store.redis.yaml"):
        (repo / name).write_text((repo / name).read_text().replace("project: reloop", f"project: {project}"))
    cfg = FeastConfig(profile="redis", repo_path=str(repo), redis_connection_string=redis_url)
    apply_repo(cfg)
    store = open_store(cfg)
    import pyarrow as pa

    events = pa.table(
        {
            "event_id": ["a", "b"],
            "ts": [1_000, 2_000],
            "user_id": ["u1", "u1"],
            "item_id": ["i1", "i2"],
            "label": pa.array([1, 0], pa.int8()),
        }
    )
    _, state, _ = compute_features(events, FeatureState.empty())
    users, items = snapshot(state, 3_000)
    write_snapshot(store, "user_stats", users, "r1")
    got = store.get_online_features(
        features=["user_stats:user_imp_all", "user_stats:user_last_items"],
        entity_rows=[{"user_id": "u1"}, {"user_id": "nobody"}],
    ).to_dict()
    assert got["user_imp_all"] == [2, None] and got["user_last_items"] == [["i2", "i1"], None]
    store.teardown()
