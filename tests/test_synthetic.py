"""The seeded drift generator: contract of the event table, determinism, and the drift it promises."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from reloop.datasets import CORE_COLUMNS, DatasetError, load_dataset
from reloop.synthetic import SCENARIOS, SyntheticError, generate, ground_truth, parse_spec


def logloss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def test_same_table_contract_as_load_dataset():
    t = generate("abrupt_ctr", n=3000, seed=1).table
    assert t.column_names[:5] == list(CORE_COLUMNS)
    assert t.schema.field("ts").type == pa.int64() and t.schema.field("label").type == pa.int8()
    assert t.schema.field("user_id").type == pa.string() and t.schema.field("event_id").type == pa.string()
    ts = t.column("ts").to_numpy()
    assert np.all(np.diff(ts) >= 0), "time-sorted"
    assert len(set(t.column("event_id").to_pylist())) == t.num_rows, "unique event ids"
    assert set(np.unique(t.column("label").to_numpy())) <= {0, 1}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_seeded_and_deterministic(scenario):
    a, b = generate(scenario, n=2000, seed=5), generate(scenario, n=2000, seed=5)
    assert a.table.equals(b.table) and np.array_equal(a.p_true, b.p_true)
    assert not a.table.equals(generate(scenario, n=2000, seed=6).table)


def test_shift_positions_per_mode():
    ab = generate("abrupt_ctr", n=10_000, seed=1, at=4000)
    assert (ab.shift_start, ab.shift_end) == (4000, 4000)
    assert ab.concept[:4000].sum() == 0 and ab.concept[4000:].all()
    gr = generate("gradual_ctr", n=10_000, seed=1, at=4000, width=2000)
    assert (gr.shift_start, gr.shift_end) == (4000, 6000)
    assert gr.concept[:4000].sum() == 0 and gr.concept[6000:].all()
    assert 0.3 < gr.concept[4000:6000].mean() < 0.7, "a linear ramp: about half new within it"
    rc = generate("recurring_ctr", n=10_000, seed=1, at=4000, period=1000)
    assert rc.concept[4000:5000].all() and not rc.concept[5000:6000].any() and rc.concept[6000:7000].all()
    st = generate("stable", n=1000, seed=1)
    assert st.shift_start is None and not st.concept.any()


def test_ctr_shift_changes_the_click_rate_and_the_stale_model_loses():
    s = generate("abrupt_ctr", n=40_000, seed=2)
    y = s.table.column("label").to_numpy()
    a = s.shift_start
    assert y[a:].mean() > 1.4 * y[:a].mean()
    assert np.allclose(s.p_true[:a], s.p_stale[:a]), "before the shift the stale model is the truth"
    assert logloss(s.p_stale[a:], y[a:]) > logloss(s.p_stale[:a], y[:a]) + 0.1


def test_interest_shift_keeps_ctr_but_breaks_the_model():
    s = generate("abrupt_interest", n=40_000, seed=2)
    y = s.table.column("label").to_numpy()
    a = s.shift_start
    assert abs(y[a:].mean() - y[:a].mean()) < 0.02
    assert logloss(s.p_stale[a:], y[a:]) > logloss(s.p_stale[:a], y[:a]) + 0.05


def test_popularity_shift_is_covariate_only():
    s = generate("abrupt_popularity", n=40_000, seed=2)
    a = s.shift_start
    assert np.allclose(s.p_true, s.p_stale), "click probabilities given (user, item) do not change"
    pop = s.table.column("item_pop").to_numpy()
    assert pop[:a].mean() - pop[a:].mean() > 0.5, "other items are shown: the popularity feature moves"


def test_load_dataset_spec_with_ground_truth_and_limit():
    t = load_dataset("synthetic:gradual_interest?n=5000&seed=3&at=1000&width=500")
    gt = ground_truth(t)
    assert gt["scenario"] == "gradual_interest" and (gt["shift_start"], gt["shift_end"]) == (1000, 1500)
    assert gt["shift_ts"] == t.column("ts")[1000].as_py()
    assert t.equals(generate("gradual_interest", n=5000, seed=3, at=1000, width=500).table)
    assert load_dataset("synthetic:stable?n=100", limit=10).num_rows == 10


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("synthetic:sideways", "unknown synthetic scenario"),
        ("synthetic:abrupt_ctr?colour=1", "unknown synthetic parameter"),
        ("synthetic:abrupt_ctr?n=lots", "is not a number"),
        ("synthetic:abrupt_ctr?n=0", "n must be positive"),
        ("synthetic:abrupt_ctr?n=10&at=20", "at must be in"),
    ],
)
def test_bad_specs_are_clear_dataset_errors(spec, msg):
    with pytest.raises(DatasetError, match=msg):
        load_dataset(spec)


def test_parse_spec_types():
    assert parse_spec("synthetic:abrupt_ctr?ctr=0.2&n=10") == ("abrupt_ctr", {"ctr": 0.2, "n": 10})
    with pytest.raises(SyntheticError):
        generate("abrupt_ctr", n=10, ctr=1.5)
