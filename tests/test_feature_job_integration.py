"""The feature job against the real broker and a real Feast repo (SQLite online, duckdb offline).

- replayed MovieLens-100K events, several micro-batches: training examples and online/offline Feast
  features of sampled users and items equal an independent pandas recomputation from the raw events;
- SIGKILL between the sinks and the offset commit, more events arrive, re-run: the interrupted batch is
  redone exactly, nothing is counted twice, features still equal the recomputation;
- 1,000 malformed records among 10,000 good ones: every bad record in the DLQ with its reason and
  original bytes, every good one in the features.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES
from tests.reference import pandas_features

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def assert_features_equal(got: pd.DataFrame, want: pd.DataFrame, what: str) -> None:
    assert len(got) == len(want), what
    for col in want.columns:
        g, w = got[col].tolist(), want[col].tolist()
        if col == "user_last_items":
            assert [list(x) for x in g] == w, f"{what}: {col}"
        elif "_ctr_" in col or "secs" in col:
            np.testing.assert_allclose(
                np.asarray(g, float), np.asarray(w, float), rtol=0, atol=1e-9, err_msg=f"{what}: {col}"
            )
        else:
            assert [int(x) for x in g] == [int(x) for x in w], f"{what}: {col}"


# ------------------------------------------------------------------ helpers


def job_config(tmp_path: Path, kafka, topic: str, **feature_job):
    from pipelines.config import FeastConfig, FeatureJobConfig, StorageConfig
    from reloop.config import ReloopConfig

    repo = tmp_path / "features"
    repo.mkdir(parents=True)
    for f in ("feature_repo.py", "feature_store.yaml"):
        shutil.copy(REPO / "features" / f, repo / f)
    k = kafka.model_copy(update={"events_topic": topic, "dlq_topic": f"{topic}.dlq", "consumer_group": topic})
    return ReloopConfig(
        kafka=k,
        storage=StorageConfig(examples_uri=str(tmp_path / "examples")),
        feature_job=FeatureJobConfig(state_uri=str(tmp_path / "state"), **feature_job),
        feast=FeastConfig(repo_path=str(repo)),
    )


def replay(table: pa.Table, kafka, topic: str) -> None:
    from reloop.replay import replay_table

    replay_table(table, kafka, topic=topic, workers=1)


def read_examples(cfg) -> pd.DataFrame:
    files = sorted(Path(cfg.storage.examples_uri).rglob("*.parquet"))
    assert files, "no training examples written"
    t = pa.concat_tables([pq.read_table(f, partitioning=None) for f in files], promote_options="default")
    return t.to_pandas()


def check_against_pandas(cfg, events: pa.Table, n_sample: int = 40, seed: int = 0) -> None:
    """Training examples and Feast features (online + offline) equal the pandas recomputation."""
    from pipelines.feast_io import ITEM_VIEW, USER_VIEW, offline_dir, open_store

    raw = events.to_pandas()
    ex = read_examples(cfg)
    # every event exactly once
    assert len(ex) == len(raw) and ex.event_id.is_unique
    assert set(ex.event_id) == set(raw.event_id)
    rng = np.random.default_rng(seed)
    sample = ex.iloc[rng.choice(len(ex), size=min(300, len(ex)), replace=False)]
    for entity, names in (("user", USER_FEATURES + ["user_last_items"]), ("item", ITEM_FEATURES)):
        want = pandas_features(raw, entity, sample[f"{entity}_id"], sample.ts)
        assert_features_equal(sample[names].reset_index(drop=True), want, f"examples/{entity}")

    store = open_store(cfg.feast, cfg.feast.repo_path)
    for entity, view, names in (
        ("user", USER_VIEW, USER_FEATURES + ["user_last_items"]),
        ("item", ITEM_VIEW, ITEM_FEATURES),
    ):
        key = f"{entity}_id"
        files = sorted(Path(offline_dir(store, view)).glob("*.parquet"))
        offline = pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()
        latest = offline.sort_values("event_timestamp").groupby(key).tail(1).set_index(key)
        ids = sorted(rng.choice(sorted(raw[key].unique()), size=n_sample, replace=False))
        as_of = [int(latest.loc[i, "event_timestamp"].value // 1_000_000) for i in ids]
        want = pandas_features(raw, entity, ids, as_of)
        assert_features_equal(latest.loc[ids, names].reset_index(drop=True), want, f"offline/{view}")
        online = store.get_online_features(
            features=[f"{view}:{n}" for n in names], entity_rows=[{key: i} for i in ids]
        ).to_dict()
        assert_features_equal(pd.DataFrame({n: online[n] for n in names}), want, f"online/{view}")


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def ml20k() -> pa.Table:
    from reloop.datasets import load_dataset

    return load_dataset("movielens-100k", limit=20_000)


def test_replayed_movielens_features_equal_pandas_recomputation(tmp_path, kafka_config, unique_topic, ml20k):
    from pipelines.consumer_group import partition_offsets
    from pipelines.feature_job import run_once

    cfg = job_config(tmp_path, kafka_config, unique_topic, max_events_per_run=7000)
    replay(ml20k, kafka_config, unique_topic)
    runs = []
    while True:
        s = run_once(cfg, repo_path=cfg.feast.repo_path)
        if not s.committed:
            break
        runs.append(s)
    # the cap is split over the partitions; events after a partition's time-aligned cut are deferred
    assert len(runs) >= 3 and all(s.records_read <= 7000 for s in runs)
    assert sum(s.accepted for s in runs) == 20_000 and sum(s.late + s.duplicates for s in runs) == 0
    assert sum(s.records_read - s.deferred for s in runs) == 20_000
    committed, _, end = partition_offsets(cfg.kafka, unique_topic, cfg.kafka.consumer_group)
    assert committed == end
    check_against_pandas(cfg, ml20k)


def test_sigkill_in_the_middle_of_the_sinks_then_rerun(tmp_path, kafka_config, unique_topic, ml20k):
    """SIGKILL after the first training-example file of the run: the re-run completes the same run."""
    from pipelines.feature_job import run_once

    cfg = job_config(tmp_path, kafka_config, unique_topic)
    config_file = tmp_path / "reloop.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    replay(ml20k.slice(0, 8_000), kafka_config, unique_topic)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.feature_job",
            "--once",
            "--config",
            str(config_file),
            "--feature_repo",
            cfg.feast.repo_path,
        ],
        cwd=REPO,
        env={**os.environ, "RELOOP_FAULT": "mid_sinks"},
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert 0 < len(read_examples(cfg)) < 8_000
    while run_once(cfg, repo_path=cfg.feast.repo_path).committed:
        pass
    check_against_pandas(cfg, ml20k.slice(0, 8_000), n_sample=30)


def test_sigkill_between_sinks_and_commit_then_rerun_counts_nothing_twice(tmp_path, kafka_config, unique_topic, ml20k):
    from pipelines.checkpoint import Plan, StateStore
    from pipelines.consumer_group import partition_offsets
    from pipelines.feature_job import run_once

    first, later = ml20k.slice(0, 12_000), ml20k.slice(12_000)
    cfg = job_config(tmp_path, kafka_config, unique_topic)
    config_file = tmp_path / "reloop.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    replay(first, kafka_config, unique_topic)
    env = {**os.environ, "RELOOP_FAULT": "before_commit"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.feature_job",
            "--once",
            "--config",
            str(config_file),
            "--feature_repo",
            cfg.feast.repo_path,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    # the sinks were written, the offsets were not committed
    committed, _, _ = partition_offsets(cfg.kafka, unique_topic, cfg.kafka.consumer_group)
    assert all(o is None for o in committed.values())
    crashed = read_examples(cfg)
    assert 0 < len(crashed) <= 12_000 and crashed.event_id.is_unique
    pending = list((Path(cfg.feature_job.state_uri) / "pending").glob("*.json"))
    assert len(pending) == 1
    crashed_run_id = Plan.from_json(pending[0].read_text()).run_id

    replay(later, kafka_config, unique_topic)  # new events arrive before the restart
    redo = run_once(cfg, repo_path=cfg.feast.repo_path)
    assert redo.committed and redo.records_read == 12_000, "the interrupted batch is redone exactly"
    assert redo.run_id == crashed_run_id
    while run_once(cfg, repo_path=cfg.feast.repo_path).committed:
        pass
    assert len(StateStore(cfg.feature_job.state_uri).state_keys()) == 1
    check_against_pandas(cfg, ml20k)


def _malformed(n: int) -> list[bytes]:
    """``n`` bad records covering every rejection kind of the event contract."""
    kinds = [
        lambda i: b"{not json %d" % i,
        lambda i: b'{"event_id": "m%d", "user_id": "1"}' % i,  # missing
        lambda i: b'{"event_id": "m%d", "ts": "yesterday", "user_id": "1", "item_id": "2", "label": 1}' % i,
        lambda i: b'{"event_id": "m%d", "ts": 881250949000, "user_id": "1", "item_id": "2", "label": 7}' % i,
        lambda i: b'{"event_id": "m%d", "ts": -5, "user_id": "1", "item_id": "2", "label": 0}' % i,
        lambda i: b'{"event_id": "m%d", "ts": 99999999999999, "user_id": "1", "item_id": "2", "label": 0}' % i,
        lambda i: b'{"event_id": "m%d", "ts": 881250949000, "user_id": "1", "item_id": "2", "label": 0, "x": 1}' % i,
        lambda i: b"[%d]" % i,
        lambda i: b"\xff\xfe%d" % i,
        lambda i: b'{"event_id": "m%d", "ts": 881250949000, "user_id": null, "item_id": "2", "label": 0}' % i,
    ]
    out = [kinds[i % len(kinds)](i) for i in range(n - 5)]
    out += [b'{"event_id": "big%d", "pad": "%s"}' % (i, b"x" * 70_000) for i in range(5)]  # oversized
    return out


def test_malformed_records_go_to_the_dlq_with_reasons_and_good_ones_to_features(
    tmp_path, kafka_config, unique_topic, ml20k
):
    from kafka import KafkaConsumer, TopicPartition

    from pipelines.feature_job import run_once
    from pipelines.kafka_io import ensure_topics, producer
    from reloop.replay import encode_batch

    good = ml20k.slice(0, 10_000)
    bad = _malformed(1_000)
    keys, values = encode_batch(good.to_batches(max_chunksize=10_000)[0])
    rng = np.random.default_rng(1)
    slots = set(rng.choice(11_000, size=1_000, replace=False).tolist())
    cfg = job_config(tmp_path, kafka_config, unique_topic)
    ensure_topics(kafka_config, [unique_topic])
    prod = producer(kafka_config, max_request_size=8 * 1024 * 1024)
    gi = bi = 0
    for slot in range(11_000):  # good ones keep their order (and their user's partition)
        if slot in slots:
            prod.send(unique_topic, key=b"bad", value=bad[bi])
            bi += 1
        else:
            prod.send(unique_topic, key=keys[gi], value=values[gi])
            gi += 1
    prod.flush()
    prod.close()

    runs = []
    while (s := run_once(cfg, repo_path=cfg.feast.repo_path)).committed:
        runs.append(s)
    assert sum(s.dead_lettered for s in runs) == 1_000 and sum(s.accepted for s in runs) == 10_000
    reasons: dict[str, int] = {}
    for s in runs:
        for k, v in s.dlq_reasons.items():
            reasons[k] = reasons.get(k, 0) + v
    assert sum(reasons.values()) == 1_000 and len(reasons) >= 8, reasons

    consumer = KafkaConsumer(
        **kafka_config.client_options(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    tps = [TopicPartition(cfg.kafka.dlq_topic, p) for p in consumer.partitions_for_topic(cfg.kafka.dlq_topic)]
    consumer.assign(tps)
    end = consumer.end_offsets(tps)
    dlq = []
    while any(consumer.position(tp) < end[tp] for tp in tps):
        for recs in consumer.poll(timeout_ms=2000).values():
            dlq.extend(recs)
    consumer.close()
    assert len(dlq) == 1_000
    assert sorted(r.value for r in dlq) == sorted(bad)
    for r in dlq:
        headers = dict(r.headers)
        assert headers["reloop.reason"].decode(), r
        assert headers["reloop.source"].decode().startswith(f"{unique_topic}/")
    reasons = {dict(r.headers)["reloop.reason"].decode().split(":")[0] for r in dlq}
    assert {"malformed JSON", "missing field(s)", "label", "ts", "unknown field(s)", "oversized payload"} <= reasons

    check_against_pandas(cfg, good, n_sample=30)


def test_offset_range_reader_splits_and_reads_every_offset_once(kafka_config, unique_topic, ml20k):
    """The splittable DoFn on FnApiRunner: many small initial splits and batches, every offset exactly once."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.consumer_group import partition_offsets
    from pipelines.kafka_source import PartitionRange, ReadKafkaRanges

    replay(ml20k.slice(0, 3000), kafka_config, unique_topic)
    _, begin, end = partition_offsets(kafka_config, unique_topic, "probe")
    ranges = [PartitionRange(unique_topic, p, begin[p] + 5, end[p]) for p in end]  # not from the start
    want = [(r.partition, o) for r in ranges for o in range(r.start, r.stop)]
    with TestPipeline(runner="FnApiRunner") as p:
        got = (
            p
            | beam.Create(ranges)
            | ReadKafkaRanges(kafka_config, batch_size=97, chunk_size=250)
            | beam.FlatMap(lambda t: zip(t["kafka_partition"].to_pylist(), t["kafka_offset"].to_pylist()))
        )
        assert_that(got, equal_to(want))


def test_every_loop_picks_up_new_events_each_tick(tmp_path, kafka_config, unique_topic, ml20k):
    from pipelines.feature_job import run_feature_job

    cfg = job_config(tmp_path, kafka_config, unique_topic)
    replay(ml20k.slice(0, 1500), kafka_config, unique_topic)
    seen = []

    def on_run(stats):
        seen.append(stats.accepted)
        if len(seen) == 1:  # more events arrive between two ticks
            replay(ml20k.slice(1500, 1000), kafka_config, unique_topic)

    run_feature_job(cfg, once=False, every=0.2, max_runs=3, repo_path=cfg.feast.repo_path, on_run=on_run)
    assert seen == [1500, 1000, 0]
    assert len(read_examples(cfg)) == 2500


def test_reset_forgets_offsets_and_state_and_the_job_recomputes(tmp_path, kafka_config, unique_topic, ml20k):
    from pipelines.checkpoint import StateStore
    from pipelines.consumer_group import partition_offsets
    from pipelines.feature_job import FeatureJobError, reset_feature_job, run_once

    cfg = job_config(tmp_path, kafka_config, unique_topic)
    replay(ml20k.slice(0, 500), kafka_config, unique_topic)
    assert run_once(cfg, repo_path=cfg.feast.repo_path).accepted == 500
    # committed offsets without their state: the job refuses to guess
    StateStore(cfg.feature_job.state_uri).prune_states(keep=set())
    replay(ml20k.slice(500, 10), kafka_config, unique_topic)
    with pytest.raises(FeatureJobError, match="reset"):
        run_once(cfg, repo_path=cfg.feast.repo_path)
    reset_feature_job(cfg)
    committed, _, _ = partition_offsets(cfg.kafka, unique_topic, cfg.kafka.consumer_group)
    assert all(o is None for o in committed.values())
    again = run_once(cfg, repo_path=cfg.feast.repo_path)
    assert again.committed and again.accepted == 510
