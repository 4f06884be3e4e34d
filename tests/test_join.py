"""The attribution join (pure core): equal to a pandas recomputation on MovieLens-100K with delayed clicks,
whatever the micro-batch boundaries; bad feedback is counted or dead-lettered, never a crash."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES
from pipelines.join import FEEDBACK_PARTITION_BASE, FEEDBACK_SCHEMA, JoinConfig, JoinState, join_batch
from tests.reference import pandas_join, pandas_join_features
from tests.test_feature_job_integration import assert_features_equal

HOUR = 3_600_000


def feedback_table(fb: pa.Table, partition: int = FEEDBACK_PARTITION_BASE) -> pa.Table:
    n = fb.num_rows
    return pa.table(
        {
            "impression_id": fb["impression_id"],
            "ts": fb["ts"],
            "kind": fb["kind"],
            "value": pa.nulls(n, pa.float64()),
            "kafka_partition": pa.array([partition] * n, pa.int32()),
            "kafka_offset": pa.array(np.arange(n), pa.int64()),
            "key": pa.array([None] * n, pa.binary()),
            "raw": pa.array([b"x"] * n, pa.binary()),
        },
        schema=FEEDBACK_SCHEMA,
    )


def imp_table(imps: pa.Table) -> pa.Table:
    n = imps.num_rows
    return imps.append_column("kafka_partition", pa.array(np.zeros(n, np.int32))).append_column(
        "kafka_offset", pa.array(np.arange(n), pa.int64())
    )


def run_join(imps: pa.Table, fb: pa.Table, cuts: list[int], cfg: JoinConfig, state=None):
    """Process both streams in micro-batches of event time ``(cuts[k-1], cuts[k]]``, like the job."""
    state = state or JoinState.empty()
    out, dlq = [], []
    lo = -1
    for hi in cuts:
        ib = imps.filter(pa.compute.and_(pa.compute.greater(imps["ts"], lo), pa.compute.less_equal(imps["ts"], hi)))
        fbb = fb.filter(pa.compute.and_(pa.compute.greater(fb["ts"], lo), pa.compute.less_equal(fb["ts"], hi)))
        res = join_batch(ib, fbb, state, cfg)
        state = res.state
        out.append(res.examples)
        dlq.append(res.dlq)
        lo = hi
    return pa.concat_tables(out, promote_options="permissive").to_pandas(), pa.concat_tables(dlq), state


@pytest.fixture(scope="module")
def delayed_ml100k():
    from reloop.datasets import load_dataset
    from reloop.synthetic import label_delay

    t = load_dataset("movielens-100k")
    imps, fb = label_delay(t, "exp:20m", seed=0)
    return t, imp_table(imps), feedback_table(fb)


def check(ex: pd.DataFrame, imps: pa.Table, fb: pa.Table, state: JoinState, cfg: JoinConfig, n_sample=300):
    idf, fdf = imps.to_pandas(), fb.to_pandas()
    want = pandas_join(idf, fdf, cfg.window_ms, state.watermark)
    assert len(ex) == len(want) and ex.impression_id.is_unique
    got = ex.set_index("impression_id").loc[want.impression_id]
    assert got.label.tolist() == want.label.tolist()
    assert got.label_ts.tolist() == want.label_ts.tolist()
    assert (got.label_ts >= got.ts).all()
    pos = want[want.label == 1]
    clicks = pos[["user_id", "item_id"]].assign(ts=pos.label_ts.values)
    rng = np.random.default_rng(0)
    sample = ex.iloc[rng.choice(len(ex), size=min(n_sample, len(ex)), replace=False)].reset_index(drop=True)
    want_f = pandas_join_features(idf, clicks, sample)
    names = USER_FEATURES + ["user_last_items"] + ITEM_FEATURES
    assert_features_equal(sample[names], want_f[names], "joined examples")
    return want


def test_join_equals_pandas_on_movielens_with_exp20m_delays_and_1h_window(delayed_ml100k):
    t, imps, fb = delayed_ml100k
    cfg = JoinConfig(window_ms=HOUR)
    ts = imps["ts"].to_numpy()
    rng = np.random.default_rng(1)
    cuts = sorted(set(rng.choice(ts, size=12, replace=False).tolist())) + [int(fb["ts"].to_numpy().max())]
    ex, dlq, state = run_join(imps, fb, cuts, cfg)
    want = check(ex, imps, fb, state, cfg)
    # every impression is an example except those whose window is still open at the end
    assert len(want) + state.open_count == t.num_rows
    late = int(
        fb.to_pandas()
        .merge(imps.to_pandas()[["impression_id", "ts"]], on="impression_id")
        .pipe(lambda d: (d.ts_x > d.ts_y + HOUR).sum())
    )
    assert state.counts["late_feedback"] == late > 0  # ~5% of clicks: P(exp(20m) > 1h) = e^-3
    assert state.counts["orphan_feedback"] == 0 and dlq.num_rows == 0
    # fake negatives: positives in the data that the window labels 0
    assert 0 < (t.to_pandas().set_index("event_id").loc[want.impression_id].label.values - want.label.values).sum()


def test_batch_boundaries_do_not_change_the_examples(delayed_ml100k):
    _, imps, fb = delayed_ml100k
    imps, fb = imps.slice(0, 20_000), fb.filter(pa.compute.less_equal(fb["ts"], imps["ts"][19_999]))
    cfg = JoinConfig(window_ms=HOUR)
    end = int(imps["ts"][19_999].as_py())
    one, _, s1 = run_join(imps, fb, [end], cfg)
    ts = imps["ts"].to_numpy()
    many, _, s2 = run_join(imps, fb, sorted(set(np.random.default_rng(2).choice(ts, 40).tolist())) + [end], cfg)
    assert s1.watermark == s2.watermark
    a = one.sort_values("impression_id").reset_index(drop=True)
    b = many.sort_values("impression_id").reset_index(drop=True)[a.columns]
    pd.testing.assert_frame_equal(a, b)


def test_state_round_trips_through_arrow(delayed_ml100k):
    _, imps, fb = delayed_ml100k
    cfg = JoinConfig(window_ms=HOUR)
    imps = imps.slice(0, 5000)
    mid, end = int(imps["ts"][2500].as_py()), int(imps["ts"][4999].as_py())
    fb = fb.filter(pa.compute.less_equal(fb["ts"], end))
    _, _, s = run_join(imps, fb, [mid], cfg)
    s2 = JoinState.from_arrow(s.to_arrow())
    assert s2.watermark == s.watermark and s2.open_count == s.open_count and s2.counts == s.counts
    a, _, _ = run_join(imps, fb, [mid, end], cfg)
    first, _, s_mid = run_join(imps, fb, [mid], cfg)
    rest, _, _ = run_join(imps, fb, [end], cfg, state=JoinState.from_arrow(s_mid.to_arrow()))
    # continuing from the restored state gives what an uninterrupted run gives
    b = pd.concat([first, rest]).sort_values("impression_id").reset_index(drop=True)
    a = a.sort_values("impression_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a[b.columns], b)


def _fb(rows):
    t = pa.table(
        {
            "impression_id": [r[0] for r in rows],
            "ts": [r[1] for r in rows],
            "kind": [r[2] if len(r) > 2 else "click" for r in rows],
        }
    )
    return feedback_table(t)


def test_orphans_duplicates_late_and_early_feedback_are_counted_and_dead_lettered():
    imps = imp_table(
        pa.table(
            {
                "impression_id": ["a", "b", "c", "a"],
                "ts": [1000, 2000, 3000, 3500],
                "user_id": ["u", "u", "v", "u"],
                "item_id": ["x", "y", "x", "x"],
            }
        )
    )
    fb = _fb([("a", 1500), ("a", 1600), ("b", 2000 + HOUR + 1), ("zzz", 2500), ("c", 2900), ("c", 3100, "purchase")])
    res = join_batch(imps, fb, JoinState.empty(), JoinConfig(window_ms=HOUR))
    s = res.stats
    assert (
        s["feedback_accepted"],
        s["duplicate_feedback"],
        s["late_feedback"],
        s["orphan_feedback"],
        s["feedback_before_impression"],
        s["other_feedback"],
        s["impressions_duplicate"],
    ) == (1, 1, 1, 1, 1, 1, 1)
    assert sorted(res.dlq["reason"].to_pylist()) == [
        "feedback before its impression: feedback ts 2900 < impression ts 3000",
        "orphan feedback: no impression 'zzz' known to the join",
    ]
    assert res.examples["impression_id"].to_pylist() == ["a"] and res.examples["label_ts"].to_pylist() == [1500]
    # later: the window of b closes (negative, though a late click came), a click on a closed one is late
    more = imp_table(pa.table({"impression_id": ["d"], "ts": [10 * HOUR], "user_id": ["w"], "item_id": ["z"]}))
    res2 = join_batch(more, _fb([("a", 10 * HOUR), ("b", 10 * HOUR)]), res.state, JoinConfig(window_ms=HOUR))
    assert sorted(zip(res2.examples["impression_id"].to_pylist(), res2.examples["label"].to_pylist())) == [
        ("b", 0),
        ("c", 0),
    ]
    assert (res2.stats["duplicate_feedback"], res2.stats["late_feedback"], res2.dlq.num_rows) == (1, 1, 0)


def test_v1_events_join_as_immediate_clicks_and_match_v1_labels():
    """A labelled stream read as impressions + clicks at the same instant: every example keeps its label."""
    from reloop.datasets import load_dataset
    from reloop.synthetic import label_delay

    t = load_dataset("movielens-100k", limit=3000)
    imps, fb = label_delay(t, "none")
    ex, _, state = run_join(imp_table(imps), feedback_table(fb), [int(t["ts"][2999].as_py())], JoinConfig(HOUR))
    lab = dict(zip(t["event_id"].to_pylist(), t["label"].to_pylist()))
    assert all(lab[i] == y for i, y in zip(ex.impression_id, ex.label))
    assert (ex.label_ts[ex.label == 1] == ex.ts[ex.label == 1]).all()


def test_with_immediate_feedback_the_features_are_v1s():
    from pipelines.aggregates import FeatureState, compute_features
    from reloop.datasets import load_dataset
    from reloop.synthetic import label_delay

    t = load_dataset("movielens-100k", limit=4000)
    imps, fb = label_delay(t, "none")
    ex, _, _ = run_join(
        imp_table(imps), feedback_table(fb), [int(t["ts"][1999].as_py()), int(t["ts"][3999].as_py())], JoinConfig(HOUR)
    )
    v1, _, _ = compute_features(t, FeatureState.empty())
    v1 = v1.to_pandas().set_index("event_id").loc[ex.impression_id].reset_index(drop=True)
    v1["user_last_items"] = [list(x) for x in v1["user_last_items"]]
    names = USER_FEATURES + ["user_last_items"] + ITEM_FEATURES
    assert_features_equal(ex[names].reset_index(drop=True), v1[names], "v2 join vs v1")


def test_a_feedback_only_micro_batch():
    """Clicks arriving in a batch without impressions (an empty table of any schema) still label theirs."""
    from pipelines.parse import CORE_SCHEMA

    imps = imp_table(
        pa.table({"impression_id": ["a", "b"], "ts": [1000, 2000], "user_id": ["u", "v"], "item_id": ["x", "y"]})
    )
    first = join_batch(imps, _fb([]), JoinState.empty(), JoinConfig(window_ms=HOUR))
    assert first.examples.num_rows == 0 and first.state.open_count == 2
    res = join_batch(
        CORE_SCHEMA.empty_table(), _fb([("a", 5000), ("b", 2 * HOUR + 5000)]), first.state, JoinConfig(window_ms=HOUR)
    )
    assert res.examples["impression_id"].to_pylist() == ["a"] and res.stats["late_feedback"] == 1
    assert res.state.open_count == 1  # b's window closes only when every partition's watermark has passed it
