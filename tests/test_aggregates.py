"""The feature math against a brute-force recomputation, whatever the batch boundaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES, AggregateConfig, FeatureState, compute_features, snapshot
from reloop.datasets import load_dataset
from tests.reference import pandas_features as brute_force

CFG = AggregateConfig()


def assert_frames_close(got: pd.DataFrame, want: pd.DataFrame) -> None:
    for col in want.columns:
        if col == "user_last_items":
            assert [list(x) for x in got[col]] == list(want[col]), col
        elif "_ctr_" in col or "secs" in col:
            np.testing.assert_allclose(
                got[col].to_numpy(float), want[col].to_numpy(float), rtol=0, atol=1e-9, err_msg=col
            )
        else:
            np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)


@pytest.fixture(scope="module")
def ml_slice() -> pa.Table:
    return load_dataset("movielens-100k", limit=6000)


@pytest.mark.parametrize("cuts", [[], [1000, 1001, 3500], list(range(250, 6000, 250))])
def test_per_event_features_equal_brute_force_for_any_batching(ml_slice, cuts):
    state, parts = FeatureState.empty(), []
    bounds = [0, *cuts, ml_slice.num_rows]
    for a, b in zip(bounds, bounds[1:]):
        feats, state, stats = compute_features(ml_slice.slice(a, b - a), state, CFG)
        assert stats["late"] == 0 and stats["duplicates"] == 0
        parts.append(feats)
    got = pa.concat_tables(parts).to_pandas()
    df = ml_slice.to_pandas()
    assert list(got.event_id) == list(df.event_id)
    sample = np.random.default_rng(0).choice(len(df), 400, replace=False)
    for entity, names in (("user", USER_FEATURES + ["user_last_items"]), ("item", ITEM_FEATURES)):
        want = brute_force(df, entity, df[f"{entity}_id"].iloc[sample], df.ts.iloc[sample])
        assert_frames_close(got.iloc[sample][names].reset_index(drop=True), want)


def test_state_is_bounded_and_eviction_keeps_all_time_counts(ml_slice):
    state = FeatureState.empty()
    for b in ml_slice.to_batches(500):
        _, state, _ = compute_features(pa.Table.from_batches([b]), state, CFG)
    # the tail holds only the horizon; the rest lives in per-entity counters
    assert state.tail.num_rows < ml_slice.num_rows
    assert state.evicted.num_rows > 0
    as_of = state.watermark + 1
    users, items = snapshot(state, as_of, CFG, users=["1", "13", "999999"], items=["50", "1"])
    df = ml_slice.to_pandas()
    assert_frames_close(
        users.to_pandas()[USER_FEATURES + ["user_last_items"]],
        brute_force(df, "user", ["1", "13", "999999"], [as_of] * 3),
    )
    assert_frames_close(items.to_pandas()[ITEM_FEATURES], brute_force(df, "item", ["50", "1"], [as_of] * 2))


def test_state_round_trips_through_arrow(ml_slice):
    a, b = ml_slice.slice(0, 3000), ml_slice.slice(3000)
    _, state, _ = compute_features(a, FeatureState.empty(), CFG)
    restored = FeatureState.from_arrow(state.to_arrow())
    assert restored.watermark == state.watermark and restored.counts == state.counts
    f1, _, _ = compute_features(b, state, CFG)
    f2, _, _ = compute_features(b, restored, CFG)
    assert f1.equals(f2)


def test_late_and_duplicate_events_are_dropped_and_counted():
    cfg = AggregateConfig(allowed_lateness_ms=1000)
    ev = pa.table(
        {
            "event_id": ["a", "b"],
            "ts": [10_000, 20_000],
            "user_id": ["u", "u"],
            "item_id": ["i", "i"],
            "label": pa.array([1, 1], pa.int8()),
        }
    )
    _, state, _ = compute_features(ev, FeatureState.empty(), cfg)
    again = pa.table(
        {
            "event_id": ["b", "c", "d", "d"],
            "ts": [20_000, 18_000, 19_500, 19_500],
            "user_id": ["u"] * 4,
            "item_id": ["i"] * 4,
            "label": pa.array([1, 1, 0, 0], pa.int8()),
        }
    )
    feats, state, stats = compute_features(again, state, cfg)
    assert stats == {"accepted": 1, "late": 1, "duplicates": 2}
    assert feats["event_id"].to_pylist() == ["d"]
    # the accepted late event sees only what came strictly before it (a at 10s), not b at 20s
    assert feats["user_imp_all"].to_pylist() == [1]
    assert state.counts == {"accepted": 3, "late": 1, "duplicates": 2}


def test_input_not_mutated(ml_slice):
    before = ml_slice.slice(0, 100)
    copy = pa.Table.from_batches(before.to_batches())
    compute_features(before, FeatureState.empty(), CFG)
    assert before.equals(copy)


def test_config_is_validated():
    with pytest.raises(ValueError, match="windows_ms"):
        AggregateConfig(windows_ms=(("x", 0),))
