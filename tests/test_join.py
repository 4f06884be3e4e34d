"""The attribution join (pure core): equal to a pandas recomputation on MovieLens-100K with delayed clicks,
whatever the micro-batch boundaries; bad feedback is counted or dead-lettered, never a crash."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES, AggregateConfig
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


def _serving_order_holds(batches: list[pa.Table], window_ms: int) -> bool:
    """What the delayed serving loop trusts (``reloop.live.DelayedServingLoop``): once a negative with
    ``label_ts = c`` is out, every example emitted after it has ``ts > c - window_ms``."""
    closed_until = -1
    for ex in batches:
        for ts, label, lts in zip(ex["ts"].to_pylist(), ex["label"].to_pylist(), ex["label_ts"].to_pylist()):
            if closed_until >= 0 and ts <= closed_until - window_ms:
                return False
            if label == 0:
                closed_until = max(closed_until, lts)
    return True


def test_a_partition_that_starts_late_holds_the_watermark_until_it_is_read(delayed_ml100k):
    """Two producers, one late: the first micro-batch reads impression and feedback partition 0, but
    partition 1 of both topics is still empty (its producer had not started). Every partition of the plan holds the
    watermark, so no window closes on partition 0 alone; the examples then equal the join of the whole
    stream, and none comes after a negative that declared it past (the serving loop's horizon). Without
    the plan's partitions (the watermark over the partitions read so far) that order breaks."""
    _, imps, fb = delayed_ml100k
    imps = imps.slice(0, 20_000)
    end = int(imps["ts"][19_999].as_py())
    fb = fb.filter(pa.compute.less_equal(fb["ts"], end))
    part = pa.array((np.arange(imps.num_rows) % 2).astype(np.int32))
    imps = imps.set_column(imps.schema.get_field_index("kafka_partition"), "kafka_partition", part)
    # a click goes to its impression's partition number in the feedback topic (both keyed by the user's)
    of_imp = dict(zip(imps["impression_id"].to_pylist(), part.to_pylist()))
    fb_part = pa.array([FEEDBACK_PARTITION_BASE + of_imp[i] for i in fb["impression_id"].to_pylist()], pa.int32())
    fb = fb.set_column(fb.schema.get_field_index("kafka_partition"), "kafka_partition", fb_part)
    mid = int(imps["ts"][10_000].as_py())
    first_i_mask = pa.compute.and_(pa.compute.less_equal(imps["ts"], mid), pa.compute.equal(part, 0))
    first_f_mask = pa.compute.and_(
        pa.compute.less_equal(fb["ts"], mid), pa.compute.equal(fb_part, FEEDBACK_PARTITION_BASE)
    )
    first_i, rest_i = imps.filter(first_i_mask), imps.filter(pa.compute.invert(first_i_mask))
    first_f, rest_f = fb.filter(first_f_mask), fb.filter(pa.compute.invert(first_f_mask))
    # features accept the late partition's impressions (the cut's lag guard, not tested here, keeps them timely)
    cfg = JoinConfig(window_ms=HOUR, features=AggregateConfig(allowed_lateness_ms=400 * 86_400_000))
    plan = [0, 1, FEEDBACK_PARTITION_BASE, FEEDBACK_PARTITION_BASE + 1]

    def run(**kw):
        a = join_batch(first_i, first_f, JoinState.empty(), cfg, **kw)
        b = join_batch(rest_i, rest_f, a.state, cfg, **{k: (v + 1000 if k == "now_ms" else v) for k, v in kw.items()})
        return a, b

    a, b = run(partitions=plan, now_ms=10_000)
    assert a.state.watermark == -1 and a.stats["negatives"] == 0  # partition 1 unread: nothing closes
    assert _serving_order_holds([a.examples, b.examples], HOUR)
    assert b.stats["impressions_behind_watermark"] == 0
    ex = pa.concat_tables([a.examples, b.examples], promote_options="permissive").to_pandas()
    want = pandas_join(imps.to_pandas(), fb.to_pandas(), HOUR, b.state.watermark)
    assert sorted(ex.impression_id) == sorted(want.impression_id)
    got = ex.set_index("impression_id").loc[want.impression_id]
    assert got.label.tolist() == want.label.tolist() and got.label_ts.tolist() == want.label_ts.tolist()

    old_a, old_b = run()  # the watermark over the partitions read so far: windows close on partition 0 alone
    assert old_a.stats["negatives"] > 0
    assert old_b.stats["impressions_behind_watermark"] > 0  # the late partition's, dropped, not leaked


def test_an_idle_partition_stops_holding_the_watermark_after_the_timeout():
    imps = imp_table(pa.table({"impression_id": ["a"], "ts": [1000], "user_id": ["u"], "item_id": ["x"]}))
    cfg = JoinConfig(window_ms=HOUR, idle_timeout_ms=30_000)
    plan = [0, 1, FEEDBACK_PARTITION_BASE]
    s = join_batch(imps, _fb([]), JoinState.empty(), cfg, partitions=plan, now_ms=0).state
    later = imp_table(pa.table({"impression_id": ["b"], "ts": [3 * HOUR], "user_id": ["u"], "item_id": ["y"]}))
    clicks = _fb([("zzz", 3 * HOUR)])
    held = join_batch(later, clicks, s, cfg, partitions=plan, now_ms=20_000)
    assert held.stats["negatives"] == 0 and held.state.watermark == -1  # partition 1 never had a record
    freed = join_batch(later.slice(0, 0), _fb([]), held.state, cfg, partitions=plan, now_ms=40_000)
    assert freed.state.watermark == 3 * HOUR and freed.examples["impression_id"].to_pylist() == ["a"]
    # the watermark never moves back, though partition 1 wakes up far behind it
    woke = imp_table(pa.table({"impression_id": ["c"], "ts": [5000], "user_id": ["v"], "item_id": ["x"]}))
    woke = woke.set_column(woke.schema.get_field_index("kafka_partition"), "kafka_partition", pa.array([1], pa.int32()))
    res = join_batch(woke, _fb([("c", 6000)]), freed.state, cfg, partitions=plan, now_ms=50_000)
    assert res.state.watermark == 3 * HOUR
    assert res.stats["impressions_behind_watermark"] == 1 and res.examples.num_rows == 0
    assert res.stats["late_feedback"] == 1 and res.stats["orphan_feedback"] == 0  # remembered as closed
    restored = JoinState.from_arrow(res.state.to_arrow())
    assert restored.watermark == 3 * HOUR and restored.partition_active_ms == res.state.partition_active_ms
