"""Fixtures for the Flink tests: the local Beam Flink job server (``reloop up --with flink``).

Import the fixture into a test module (``from tests.flink_support import flink_job_endpoint``). The
server is shared and started idempotently; if this session started it, it is stopped (by pid) at the end,
so a test run does not leave a 1 GiB JVM behind.
"""

from __future__ import annotations

import pytest


def flink_args(endpoint: str, parallelism: int = 2) -> list[str]:
    """Beam flags that run a pipeline on the local job server; the Python workers live in this process."""
    return [
        "--runner=PortableRunner",
        f"--job_endpoint={endpoint}",
        "--environment_type=LOOPBACK",
        f"--parallelism={parallelism}",
    ]


@pytest.fixture(scope="session")
def flink_job_endpoint() -> str:
    from reloop import services

    svc = services.get("flink")
    was_up = svc.status().running
    try:
        svc.start()
    except services.ServiceError as e:
        pytest.fail(f"the Flink job server did not start: {e}")
    yield svc.address()
    if not was_up:
        svc.stop()


def isolated_job_config(root, kafka, topic: str, name: str):
    """A ReloopConfig whose feature job has its own consumer group, state, examples and Feast repo under
    ``root/name``, reading ``topic``: two of them over the same topic never share anything but the events."""
    import shutil
    from pathlib import Path

    from pipelines.config import FeastConfig, FeatureJobConfig, StorageConfig
    from reloop.config import ReloopConfig

    d = Path(root) / name
    repo = d / "features"
    repo.mkdir(parents=True)
    features = Path(__file__).resolve().parent.parent / "features"
    for f in ("feature_repo.py", "feature_store.yaml"):
        shutil.copy(features / f, repo / f)
    k = kafka.model_copy(
        update={"events_topic": topic, "dlq_topic": f"{topic}.dlq", "consumer_group": f"{topic}.{name}"}
    )
    return ReloopConfig(
        kafka=k,
        storage=StorageConfig(examples_uri=str(d / "examples")),
        feature_job=FeatureJobConfig(state_uri=str(d / "state")),
        feast=FeastConfig(repo_path=str(repo)),
    )


def job_outputs(cfg) -> dict:
    """Everything the feature job produced, in a canonical order: training examples, offline Feast
    snapshots per view, online Feast values of every entity seen, and the saved feature states."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.feast_io import ITEM_VIEW, USER_VIEW, offline_dir, open_store

    def read_all(directory: str, sort: list[str]) -> pa.Table:
        files = sorted(Path(directory).rglob("*.parquet"))
        assert files, f"no Parquet output under {directory}"
        # the file names carry the run id (identical on both runners); the dt= partition is not a column
        t = pa.concat_tables([pq.read_table(f, partitioning=None) for f in files], promote_options="default")
        return t.sort_by([(c, "ascending") for c in sort])

    store = open_store(cfg.feast, cfg.feast.repo_path)
    out = {"examples": read_all(cfg.storage.examples_uri, ["ts", "kafka_partition", "kafka_offset"])}
    for view, key in ((USER_VIEW, "user_id"), (ITEM_VIEW, "item_id")):
        offline = read_all(offline_dir(store, view), ["event_timestamp", key])
        out[f"offline_{view}"] = offline
        ids = sorted(set(offline[key].to_pylist()))
        fv = store.get_feature_view(view)
        refs = [f"{view}:{f.name}" for f in fv.features]
        online = store.get_online_features(features=refs, entity_rows=[{key: i} for i in ids]).to_dict()
        out[f"online_{view}"] = online
    return out


@pytest.fixture(scope="session")
def kafka_expansion_service() -> str:
    """The Java KafkaIO expansion service (same Beam release as the Python SDK), started on demand."""
    from reloop import services

    svc = services.get("expansion")
    was_up = svc.status().running
    try:
        svc.start()
    except services.ServiceError as e:
        pytest.fail(f"the Kafka expansion service did not start: {e}")
    yield svc.address()
    if not was_up:
        svc.stop()
