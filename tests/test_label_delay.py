"""--label-delay: a labelled dataset becomes an impression stream plus a seeded, delayed click stream."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from reloop.replay import encode_batch
from reloop.synthetic import SyntheticError, generate, label_delay, parse_delay, parse_spec


def _table(n=20_000, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "ts": 1 + np.arange(n, dtype=np.int64) * 1000,
            "user_id": [f"u{i % 50}" for i in range(n)],
            "item_id": [f"i{i % 70}" for i in range(n)],
            "label": pa.array(rng.random(n) < 0.3, pa.bool_()).cast(pa.int8()),
            "device": ["web"] * n,
        }
    )


def test_every_row_is_an_impression_and_every_positive_one_delayed_click():
    t = _table()
    imps, fb = label_delay(t, "exp:20m", seed=3)
    assert imps.num_rows == t.num_rows and "label" not in imps.column_names and "device" in imps.column_names
    pos = t.filter(pa.compute.equal(t["label"], 1))
    assert sorted(fb["impression_id"].to_pylist()) == sorted(pos["event_id"].to_pylist())
    assert fb["ts"].to_numpy().tolist() == sorted(fb["ts"].to_numpy().tolist())  # time-ordered
    imp_ts = dict(zip(t["event_id"].to_pylist(), t["ts"].to_pylist()))
    delays = np.array([c - imp_ts[i] for i, c in zip(fb["impression_id"].to_pylist(), fb["ts"].to_pylist())])
    assert (delays >= 0).all()
    assert abs(delays.mean() / 1_200_000 - 1) < 0.05  # exponential, mean 20 minutes
    assert abs((delays > 3_600_000).mean() - np.exp(-3)) < 0.01  # P(delay > 1 h) = e^-3
    again = label_delay(t, "exp:20m", seed=3)
    assert again[1].equals(fb) and not label_delay(t, "exp:20m", seed=4)[1].equals(fb)


@pytest.mark.parametrize(
    "spec,mean_ms",
    [("fixed:90s", 90_000), ("uniform:1m:3m", 120_000), ("none", 0), ("lognormal:10m:0.5", 600_000 * np.exp(0.125))],
)
def test_delay_kinds(spec, mean_ms):
    d = parse_delay(spec).sample(200_000, np.random.default_rng(0))
    assert abs(d.mean() - mean_ms) <= 0.02 * max(mean_ms, 1)
    spec_ = parse_delay(spec)
    if spec_.kind not in ("none", "fixed"):  # the cdf is the sampler's
        med = np.median(d)
        assert abs(float(spec_.cdf(med)) - 0.5) < 0.02


@pytest.mark.parametrize(
    "bad", ["exp", "exp:-5m", "exp:0", "gauss:1m", "uniform:5m:1m", "fixed:abc", "lognormal:10m:x", "exp:1m:2m"]
)
def test_bad_delay_specs_are_clear_errors(bad):
    with pytest.raises(SyntheticError):
        parse_delay(bad)


def test_wire_records_are_contract_v2():
    from pipelines.events import Feedback, Impression, parse_feedback, parse_impression

    imps, fb = label_delay(_table(50), "fixed:1s")
    k, v = encode_batch(imps.to_batches()[0], "impression")
    first = parse_impression(v[0], now_ms=10**13)
    assert isinstance(first, Impression) and first.context == {"device": "web"} and k[0] == b"u0"
    k, v = encode_batch(fb.to_batches()[0], "feedback")
    assert isinstance(parse_feedback(v[0], now_ms=10**13), Feedback) and k[0] == fb["impression_id"][0].as_py().encode()


def test_synthetic_stream_has_a_known_true_delay_distribution():
    s = generate("stable", n=20_000, seed=5, delay="exp:20m")
    assert parse_spec("synthetic:stable?n=10&delay=exp:20m")[1] == {"n": 10, "delay": "exp:20m"}
    plain = generate("stable", n=20_000, seed=5)
    assert s.table.equals(plain.table.replace_schema_metadata(s.table.schema.metadata))  # same stream
    labels = s.table["label"].to_numpy()
    assert ((s.delays_ms >= 0) == (labels == 1)).all()
    imps, fb = s.delayed()
    assert imps.num_rows == 20_000 and fb.num_rows == labels.sum()
    d = s.delays_ms[labels == 1]
    assert abs(d.mean() / 1_200_000 - 1) < 0.1
    assert s.ground_truth()["delay"] == "exp:20m"
    with pytest.raises(SyntheticError):
        plain.delayed()
