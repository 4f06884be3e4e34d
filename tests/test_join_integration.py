"""The contract-v2 feature job against the real broker: MovieLens-100K replayed with ``--label-delay exp:20m``
and joined with ``--attribution-window 1h`` on FnApiRunner equals the pandas recomputation of the join
(counts, labels, features, label-arrival times), also after SIGKILLs mid-window; bad feedback goes to
the DLQ with a reason."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES
from tests.reference import pandas_join, pandas_join_features
from tests.test_feature_job_integration import REPO, assert_features_equal, job_config, read_examples

pytestmark = pytest.mark.integration
HOUR = 3_600_000


def v2_config(tmp_path, kafka, topic, **fj):
    cfg = job_config(tmp_path, kafka, topic, attribution_window_s=3600.0, **fj)
    k = cfg.kafka.model_copy(update={"impressions_topic": f"{topic}.imp", "feedback_topic": f"{topic}.fb"})
    return cfg.model_copy(update={"kafka": k})


@pytest.fixture(scope="module")
def ml100k():
    from reloop.datasets import load_dataset

    return load_dataset("movielens-100k")


def replay_v2(table, cfg, seed=0):
    from reloop.replay import replay_delayed

    return replay_delayed(table, cfg.kafka, "exp:20m", seed=seed, workers=1)


def final_state(cfg):
    from pipelines.checkpoint import StateStore

    store = StateStore(cfg.feature_job.state_uri)
    keys = store.state_keys()
    assert len(keys) == 1, keys
    return store.load_join_state(keys[0])


def check_against_pandas(cfg, table, n_sample=300):
    from reloop.synthetic import label_delay

    imps, fb = label_delay(table, "exp:20m", seed=0)
    state = final_state(cfg)
    ex = read_examples(cfg)
    idf, fdf = imps.to_pandas(), fb.to_pandas()
    want = pandas_join(idf, fdf, HOUR, state.watermark)
    assert len(ex) == len(want) and ex.impression_id.is_unique, (len(ex), len(want))
    assert len(want) + state.open_count == table.num_rows
    got = ex.set_index("impression_id").loc[want.impression_id]
    assert got.label.tolist() == want.label.tolist()
    assert got.label_ts.tolist() == want.label_ts.tolist()
    pos = want[want.label == 1]
    clicks = pos[["user_id", "item_id"]].assign(ts=pos.label_ts.values)
    rng = np.random.default_rng(0)
    sample = ex.iloc[rng.choice(len(ex), size=min(n_sample, len(ex)), replace=False)].reset_index(drop=True)
    names = USER_FEATURES + ["user_last_items"] + ITEM_FEATURES
    assert_features_equal(sample[names], pandas_join_features(idf, clicks, sample)[names], "joined examples")
    return state, want


def drain(cfg):
    from pipelines.feature_job import run_join_once

    runs = []
    while (s := run_join_once(cfg, repo_path=cfg.feast.repo_path)).committed:
        runs.append(s)
    return runs


def test_joined_movielens_equals_the_pandas_join(tmp_path, kafka_config, unique_topic, ml100k):
    from pipelines.consumer_group import partition_offsets

    cfg = v2_config(tmp_path, kafka_config, unique_topic, max_events_per_run=40_000)
    replay_v2(ml100k, cfg)
    runs = drain(cfg)
    assert len(runs) >= 3
    state, want = check_against_pandas(cfg, ml100k)
    j = state.counts
    assert j["impressions_accepted"] == 100_000 and j["orphan_feedback"] == 0
    assert j["late_feedback"] > 0 and j["positives"] == int(want.label.sum())
    assert sum(s.dead_lettered for s in runs) == 0
    for t in (cfg.kafka.impressions_topic, cfg.kafka.feedback_topic):
        committed, _, end = partition_offsets(cfg.kafka, t, cfg.kafka.consumer_group)
        assert committed == end


@pytest.mark.parametrize("fault", ["before_commit", "mid_sinks"])
def test_sigkill_mid_window_neither_loses_nor_doubles_an_example(tmp_path, kafka_config, unique_topic, ml100k, fault):
    cfg = v2_config(tmp_path, kafka_config, unique_topic, max_events_per_run=40_000)
    config_file = tmp_path / "reloop.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    replay_v2(ml100k, cfg)
    drain_first = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.feature_job",
            "--once",
            "--config",
            str(config_file),
            "--feature_repo",
            cfg.feast.repo_path,
            "--attribution-window",
            "1h",
        ],
        cwd=REPO,
        env={**os.environ, "RELOOP_FAULT": ""},
        capture_output=True,
        timeout=600,
    )
    assert drain_first.returncode == 0, drain_first.stderr.decode()[-2000:]
    # the second run is killed with windows open (the first left thousands of impressions pending)
    from pipelines.checkpoint import StateStore

    open_before = (
        StateStore(cfg.feature_job.state_uri)
        .load_join_state(StateStore(cfg.feature_job.state_uri).state_keys()[0])
        .open_count
    )
    assert open_before > 0
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
            "--attribution-window",
            "1h",
        ],
        cwd=REPO,
        env={**os.environ, "RELOOP_FAULT": fault},
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    drain(cfg)
    state, _ = check_against_pandas(cfg, ml100k, n_sample=150)
    assert state.counts["impressions_accepted"] == 100_000  # the redone run counted once


def test_bad_impressions_and_feedback_go_to_the_dlq_with_reasons(tmp_path, kafka_config, unique_topic, ml100k):
    from kafka import KafkaConsumer, TopicPartition

    from pipelines.kafka_io import ensure_topics, producer

    cfg = v2_config(tmp_path, kafka_config, unique_topic)
    small = ml100k.slice(0, 3000)
    replay_v2(small, cfg)
    t_end = int(small["ts"][2999].as_py())
    ensure_topics(kafka_config, [cfg.kafka.impressions_topic, cfg.kafka.feedback_topic])
    prod = producer(kafka_config)
    bad_imps = [
        b"{nope",
        b'{"impression_id": "x1", "ts": 5}',
        b'{"impression_id": "", "ts": 5, "user_id": "u", "item_id": "i"}',
        b"[1]",
    ]
    bad_fb = [
        b"{{",
        b'{"impression_id": "ml100k-1", "ts": 5, "kind": "like"}',
        b'{"impression_id": "never-shown", "ts": %d, "kind": "click"}' % (t_end - 1000),
        b'{"impression_id": "ml100k-3", "ts": 7, "kind": "click", "extra": 1}',
    ]
    for v in bad_imps:
        prod.send(cfg.kafka.impressions_topic, key=b"u", value=v)
    for v in bad_fb:
        prod.send(cfg.kafka.feedback_topic, key=b"k", value=v)
    prod.flush()
    prod.close()
    runs = drain(cfg)
    assert sum(s.dead_lettered for s in runs) == 8
    consumer = KafkaConsumer(**kafka_config.client_options(), group_id=None, auto_offset_reset="earliest")
    tps = [TopicPartition(cfg.kafka.dlq_topic, p) for p in consumer.partitions_for_topic(cfg.kafka.dlq_topic)]
    consumer.assign(tps)
    end = consumer.end_offsets(tps)
    recs = []
    while any(consumer.position(tp) < end[tp] for tp in tps):
        for rs in consumer.poll(timeout_ms=2000).values():
            recs.extend(rs)
    consumer.close()
    reasons = {r.value: dict(r.headers)["reloop.reason"].decode() for r in recs}
    assert set(reasons) == set(bad_imps + bad_fb)
    assert reasons[bad_fb[2]].startswith("orphan feedback")
    assert reasons[bad_fb[1]].startswith("kind")
    assert all(
        dict(r.headers)["reloop.source"].decode().startswith(cfg.kafka.feedback_topic + "/")
        for r in recs
        if r.value in bad_fb
    )
    state = final_state(cfg)
    assert state.counts["orphan_feedback"] == 1 and state.counts["impressions_accepted"] == 3000


def test_paced_delayed_replay_and_the_cli(tmp_path, kafka_config, unique_topic, ml100k):
    """Paced, both streams go side by side on one clock; the CLI refuses a bad --label-delay clearly."""
    from typer.testing import CliRunner

    from pipelines.kafka_io import end_offsets
    from reloop.cli import app
    from reloop.replay import replay_delayed

    cfg = v2_config(tmp_path, kafka_config, unique_topic)
    small = ml100k.slice(0, 300)
    span_s = (small["ts"][299].as_py() - small["ts"][0].as_py()) / 1000
    stats = replay_delayed(small, cfg.kafka, "exp:1m", speed=span_s / 2.0)  # ~2 s of wall time
    assert stats.impressions.events == 300 and stats.feedback.events == int(small["label"].to_numpy().sum())
    assert sum(end_offsets(cfg.kafka, cfg.kafka.impressions_topic).values()) == 300
    assert sum(end_offsets(cfg.kafka, cfg.kafka.feedback_topic).values()) == stats.feedback.events
    res = CliRunner().invoke(app, ["replay", "--limit", "10", "--label-delay", "gauss:5m"])
    assert res.exit_code != 0 and "unknown delay distribution" in res.output
