"""The feature job's transforms with TestPipeline/assert_that, no services (state and files in tmp dirs)."""

from __future__ import annotations

import json
import random

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES, AggregateConfig, FeatureState, compute_features
from pipelines.checkpoint import Plan, StateStore
from pipelines.kafka_source import raw_table
from pipelines.parse import concat_events, parse_batch
from pipelines.transforms import ComputeFeatures, ParseRecords, WriteExamples, align_partitions, compute_batch
from reloop.datasets import load_dataset
from reloop.replay import encode_batch

NOW = 10**13


def _raw_batches(table: pa.Table, batch: int = 500, bad_every: int = 0) -> list[pa.Table]:
    """The event table as raw Kafka record tables, round-robin over 2 partitions; optionally bad records."""
    keys, values = encode_batch(table.combine_chunks().to_batches(max_chunksize=table.num_rows)[0])
    if bad_every:
        for i in range(0, len(values), bad_every):
            values[i] = b'{"event_id": "broken'
    out, offsets = [], {0: 0, 1: 0}
    for start in range(0, len(values), batch):
        p = (start // batch) % 2
        n = len(values[start : start + batch])
        out.append(
            raw_table(
                p, list(range(offsets[p], offsets[p] + n)), keys[start : start + batch], values[start : start + batch]
            )
        )
        offsets[p] += n
    return out


@pytest.fixture(scope="module")
def events() -> pa.Table:
    return load_dataset("movielens-100k", limit=3000)


def test_parse_routes_bad_records_to_dlq_and_keeps_every_good_one(events):
    raws = _raw_batches(events, bad_every=10)
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(raws) | ParseRecords(now_ms=NOW)
        good = out.events | "GoodIds" >> beam.FlatMap(lambda t: t["event_id"].to_pylist())
        bad = out.dlq | "BadRows" >> beam.FlatMap(lambda t: zip(t["reason"].to_pylist(), t["value"].to_pylist()))
        reasons = bad | beam.Map(lambda r: (r[0].split(":")[0], r[1]))
        want_good = [e for i, e in enumerate(events["event_id"].to_pylist()) if i % 10]
        assert_that(good, equal_to(want_good), label="good")
        assert_that(reasons, equal_to([("malformed JSON", b'{"event_id": "broken')] * 300), label="bad")


def test_compute_features_equals_direct_call_whatever_the_batch_order(events, tmp_path):
    raws = _raw_batches(events)
    random.Random(7).shuffle(raws)  # the runner may deliver batches in any order
    parsed = [
        parse_batch(
            r["value"].to_pylist(),
            partition=int(r["kafka_partition"][0].as_py()),
            offsets=r["kafka_offset"].to_pylist(),
            now_ms=NOW,
        )[0]
        for r in raws
    ]
    cfg = AggregateConfig()
    plan = Plan("t", {0: 0, 1: 0}, {0: 10**6, 1: 10**6}, NOW)
    kept, stops = align_partitions(concat_events(parsed), plan.stop)
    assert 0 < kept.num_rows < events.num_rows and min(stops.values()) < 10**6 == max(stops.values())
    want, want_state, _ = compute_features(kept, FeatureState.empty(), cfg)
    want_rows = [tuple(r[c] for c in ["event_id", *USER_FEATURES, *ITEM_FEATURES]) for r in want.to_pylist()]
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(parsed) | ComputeFeatures(str(tmp_path), plan, cfg)
        rows = out.examples | beam.FlatMap(
            lambda t: [tuple(r[c] for c in ["event_id", *USER_FEATURES, *ITEM_FEATURES]) for r in t.to_pylist()]
        )
        entities = out.snapshots | beam.Map(lambda kv: (kv[0], kv[1].num_rows))
        assert_that(rows, equal_to(want_rows), label="examples")
        assert_that(
            entities,
            equal_to(
                [("user", len(set(kept["user_id"].to_pylist()))), ("item", len(set(kept["item_id"].to_pylist())))]
            ),
            label="snapshots",
        )
        assert_that(out.stops, equal_to([stops]), label="stops")
    store = StateStore(str(tmp_path))
    assert store.load_result(plan.run_id) == stops
    saved = store.load_state(plan.with_stops(stops).stop_key)
    assert saved is not None and saved.watermark == want_state.watermark
    assert (
        saved.tail.num_rows
        + int(np.sum(saved.evicted.filter(pa.compute.equal(saved.evicted["entity"], "user"))["imp"].to_numpy()))
        == kept.num_rows
    )


def test_compute_features_continues_from_the_saved_state(events, tmp_path):
    cfg = AggregateConfig()
    first, second = events.slice(0, 1000), events.slice(1000)

    def parse(t):
        return concat_events(
            [
                parse_batch(
                    r["value"].to_pylist(),
                    partition=0,  # noqa: E731
                    offsets=r["kafka_offset"].to_pylist(),
                    now_ms=NOW,
                )[0]
                for r in _raw_batches(t)
            ]
        )

    store = StateStore(str(tmp_path))
    plan = Plan("t", {0: 1000}, {0: 3000}, NOW, committed={0: 1000})
    store.save_state(plan.start_key, compute_batch(parse(first), FeatureState.empty(), cfg).state)
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create([parse(second)]) | ComputeFeatures(str(tmp_path), plan, cfg)
        counts = out.examples | beam.Map(lambda t: t["user_imp_all"].to_pylist())
        want, _, _ = compute_features(events, FeatureState.empty(), cfg)
        assert_that(counts, equal_to([want["user_imp_all"].to_pylist()[1000:]]))


def test_compute_features_refuses_to_restart_without_the_committed_state(events, tmp_path):
    with pytest.raises(Exception, match="no feature state"):
        with TestPipeline(runner="FnApiRunner") as p:
            _ = (
                p
                | beam.Create(
                    [
                        events.append_column(
                            "kafka_partition", pa.array([0] * events.num_rows, pa.int32())
                        ).append_column("kafka_offset", pa.array(range(events.num_rows), pa.int64()))
                    ]
                )
                | ComputeFeatures(str(tmp_path), Plan("t", {0: 5}, {0: 9}, NOW, {0: 5}), AggregateConfig())
            )


def test_examples_are_partitioned_by_day_and_rewritten_idempotently(events, tmp_path):
    feats, _, _ = compute_features(events, FeatureState.empty(), AggregateConfig())
    for _ in range(2):  # the same run twice (a crash before the commit, then the re-run)
        with TestPipeline(runner="FnApiRunner") as p:
            _ = p | beam.Create([feats]) | WriteExamples(str(tmp_path / "ex"), "run-1")
    files = sorted(f.relative_to(tmp_path / "ex").as_posix() for f in (tmp_path / "ex").rglob("*.parquet"))
    assert files and all(f.startswith("dt=") and f.endswith("/part-run-1.parquet") for f in files)
    back = ds.dataset(tmp_path / "ex", format="parquet", partitioning="hive").to_table()
    assert back.num_rows == events.num_rows
    assert sorted(back["event_id"].to_pylist()) == sorted(events["event_id"].to_pylist())


def test_plan_json_and_pending_round_trip(tmp_path):
    from pipelines.checkpoint import Plan

    store = StateStore(str(tmp_path))
    plan = Plan("t", {0: 5, 1: 0}, {0: 9, 1: 3}, 123, {0: 5})
    store.save_pending(plan)
    assert store.load_pending(plan.start_key) == plan
    assert plan.committed_after == {0: 9, 1: 3} and plan.run_id != plan.stop_key != plan.start_key
    assert json.loads(plan.to_json())["topic"] == "t"
    store.clear_pending()
    assert store.load_pending(plan.start_key) is None


def test_a_rerun_reuses_the_saved_cut(events, tmp_path):
    """After a crash the re-run must cut where the first attempt did (idleness may have changed since)."""
    raws = _raw_batches(events)
    parsed = [
        parse_batch(
            r["value"].to_pylist(),
            partition=int(r["kafka_partition"][0].as_py()),
            offsets=r["kafka_offset"].to_pylist(),
            now_ms=NOW,
        )[0]
        for r in raws
    ]
    plan = Plan("t", {0: 0, 1: 0}, {0: 10**6, 1: 10**6}, NOW)
    StateStore(str(tmp_path)).save_result(plan.run_id, {0: 700, 1: 10**6})
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(parsed) | ComputeFeatures(str(tmp_path), plan, AggregateConfig())
        n0 = out.examples | beam.Map(lambda t: int((t["kafka_partition"].to_numpy() == 0).sum()))
        assert_that(n0, equal_to([700]), label="p0")
        assert_that(out.stops, equal_to([{0: 700, 1: 10**6}]), label="stops")
