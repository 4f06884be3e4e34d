"""Storage on a real S3 API (s3proxy, ``reloop up s3``): the registry, trainer checkpoints and the feature
job's training examples and state live under ``s3://`` URIs, and a killed object store never leaves a
partial registry version current.

Objects are checked twice: through the S3 API, and on s3proxy's own disk (its filesystem backend), so a
write that silently went to a local directory instead would fail the test.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from reloop import services

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3():
    """s3proxy up (started here if it was not), and this process's environment pointed at it."""
    proxy = services.S3Proxy()
    own = proxy.pid() is None
    proxy.start()
    saved = {k: os.environ.get(k) for k in services.s3_client_env()}
    os.environ.update(services.s3_client_env())
    yield proxy
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if own:
        proxy.stop()


def on_disk(proxy: services.S3Proxy, uri: str) -> Path:
    """Where s3proxy's filesystem backend keeps the objects of ``s3://bucket/prefix``."""
    assert uri.startswith("s3://")
    return proxy.dir / "data" / uri[len("s3://") :]


def prefix() -> str:
    return f"s3://{services.S3_BUCKET}/tests/{uuid.uuid4().hex[:10]}"


def test_registry_on_s3(s3, tmp_path):
    from jobs.registry import ModelRegistry, prune

    uri = prefix() + "/registry"
    reg = ModelRegistry(uri)
    assert type(reg.fs).__name__ == "S3FileSystem" and not reg.local
    e1 = reg.publish(
        {"w": torch.arange(4.0)},
        model_config={"kind": "lr"},
        feature_service="ctr_v1",
        metrics={"auc": 0.7},
        promote=True,
    )
    e2 = reg.publish({"w": torch.ones(3)}, model_config={"kind": "lr"}, feature_service="ctr_v1")
    assert (e1.version, e2.version) == ("v000001", "v000002")
    again = ModelRegistry(uri)  # a fresh client sees the same entries
    assert again.versions() == ["v000001", "v000002"] and again.current() == "v000001"
    entry, w = again.load()
    assert entry.metrics == {"auc": 0.7} and w["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    again.promote("v000002")
    assert ModelRegistry(uri).current() == "v000002" and ModelRegistry(uri).rollback() == "v000001"
    d = on_disk(s3, uri)
    assert (d / "CURRENT").is_file() and (d / "versions" / "v000002" / "model.safetensors").is_file()
    reg.publish({"w": torch.zeros(1)}, model_config={"kind": "lr"}, feature_service="ctr_v1")
    assert prune(reg, keep=1) == []  # v1 current, v2 previous, v3 newest: all protected
    assert not list(tmp_path.iterdir())


def test_checkpoints_on_s3(s3):
    import pyarrow.parquet as pq

    from jobs.checkpoints import CheckpointStore

    uri = prefix() + "/trainer"
    store = CheckpointStore(uri)
    assert not store.local
    for i in range(1, 4):
        store.commit(f"ckpt-{i:06d}", {"state.json": b'{"i": %d}' % i, "model.safetensors": b"x" * (i * 1000)})
    store.write_table(pa.table({"event_id": ["a", "b"], "pred": [0.1, 0.9]}), "predictions", "part-1.parquet")
    assert CheckpointStore(uri).latest() == "ckpt-000003"
    assert store.read("ckpt-000002", "state.json") == b'{"i": 2}'
    store.gc(keep=1)
    d = on_disk(s3, uri)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-000003"]
    assert pq.read_table(d / "predictions" / "part-1.parquet")["pred"].to_pylist() == [0.1, 0.9]


def test_trainer_learns_from_and_checkpoints_to_s3(s3):
    """The incremental trainer (no Ray: in process) reads examples from s3:// and checkpoints there, and a
    second trainer resumes from the first one's checkpoint in the bucket."""
    from jobs.trainer import IncrementalTrainer, TrainerConfig
    from pipelines.aggregates import USER_FEATURES
    from pipelines.storage import open_filesystem, write_parquet_atomic

    root = prefix()
    fs, path, _ = open_filesystem(root + "/examples")
    n = 3000
    rng = __import__("numpy").random.default_rng(0)
    t = pa.table(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "ts": list(range(n)),
            "user_id": [f"u{i % 50}" for i in range(n)],
            "item_id": [f"i{i % 70}" for i in range(n)],
            "label": rng.integers(0, 2, n).astype("int8"),
            USER_FEATURES[0]: rng.random(n),
        }
    )
    write_parquet_atomic(fs, f"{path}/run-1/part-0.parquet", t.slice(0, 2000))
    write_parquet_atomic(fs, f"{path}/run-2/part-0.parquet", t.slice(2000))
    cfg = TrainerConfig(
        examples_uri=root + "/examples",
        checkpoint_dir=root + "/trainer",
        registry_uri=root + "/registry",
        model_kind="lr",
        checkpoint_every=1000,
        publish_every=1,
        idle_exit=0.0,
        max_examples=2000,
        seed=0,
    )
    first = IncrementalTrainer(cfg).run()
    assert 2000 <= first["learned"] < n
    second = IncrementalTrainer(TrainerConfig(**{**cfg.__dict__, "max_examples": None})).run()
    assert second["learned"] == n  # resumed from the bucket's checkpoint: the rest, exactly once
    d = on_disk(s3, root)
    assert (d / "trainer" / "LATEST").is_file()
    assert list((d / "registry" / "versions").iterdir())


def test_feature_job_writes_examples_and_state_to_s3(s3, kafka_config, unique_topic, tmp_path):
    """One real feature-job micro-batch (Kafka -> Beam -> Feast + examples) with s3:// example and state URIs."""
    import shutil

    from jobs.examples import ExampleStore, Position
    from pipelines.config import FeastConfig, FeatureJobConfig, StorageConfig
    from pipelines.feature_job import run_once
    from reloop.config import ReloopConfig
    from reloop.datasets import load_dataset
    from reloop.replay import replay_table

    repo = tmp_path / "features"
    repo.mkdir()
    src = Path(__file__).resolve().parent.parent / "features"
    for f in ("feature_repo.py", "feature_store.yaml"):
        shutil.copy(src / f, repo / f)
    root = prefix()
    k = kafka_config.model_copy(
        update={"events_topic": unique_topic, "dlq_topic": f"{unique_topic}.dlq", "consumer_group": unique_topic}
    )
    cfg = ReloopConfig(
        kafka=k,
        storage=StorageConfig(examples_uri=root + "/examples"),
        feature_job=FeatureJobConfig(state_uri=root + "/feature_state"),
        feast=FeastConfig(repo_path=str(repo)),
    )
    events = load_dataset("movielens-100k", limit=2000)
    replay_table(events, k, topic=unique_topic, workers=1)
    stats = run_once(cfg, topic=unique_topic)
    assert stats.committed and stats.examples_written == 2000
    store = ExampleStore(root + "/examples")
    got = sum(b.num_rows for b, _ in store.batches(Position(), batch_size=4096))
    assert got == 2000
    d = on_disk(s3, root)
    assert list((d / "examples").rglob("*.parquet")) and list((d / "feature_state").rglob("*"))
    assert not (tmp_path / "examples").exists() and not (tmp_path / "feature_state").exists()


def test_killed_store_during_a_registry_write_leaves_no_partial_current(s3):
    """SIGKILL s3proxy while a version's weights are uploading: the publish fails, and after a restart the
    current version is still the old one, the partial entry is not listed and cannot be promoted."""
    from jobs.registry import CorruptEntryError, ModelRegistry, RegistryError

    uri = prefix() + "/registry"
    reg = ModelRegistry(uri)
    reg.publish({"w": torch.ones(2)}, model_config={"kind": "lr"}, feature_service="ctr_v1", promote=True)
    big = {f"t{i}": torch.randn(4_000_000) for i in range(12)}  # ~190 MB: a multipart upload of a few seconds
    outcome: dict[str, object] = {}

    def write() -> None:
        try:
            outcome["entry"] = reg.publish(big, model_config={"kind": "lr"}, feature_service="ctr_v1", promote=True)
        except Exception as e:  # noqa: BLE001 - the failure is what we check
            outcome["error"] = e

    th = threading.Thread(target=write)
    th.start()
    marker = on_disk(s3, uri) / "versions" / "v000002"
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:  # the entry's directory is made first
        time.sleep(0.05)
    assert marker.exists(), "the second publish never began"
    time.sleep(0.3)
    s3.kill()
    th.join(timeout=300)
    assert not th.is_alive(), "publish hung after the store died"
    assert "error" in outcome, f"publish succeeded although the store was killed: {outcome}"
    s3.start()
    after = ModelRegistry(uri)
    assert after.current() == "v000001"
    assert after.versions() == ["v000001"]
    assert "v000002" in after.versions(include_partial=True)
    with pytest.raises((CorruptEntryError, RegistryError)):
        after.promote("v000002")
    assert after.current() == "v000001" and after.load()[1]["w"].tolist() == [1.0, 1.0]
