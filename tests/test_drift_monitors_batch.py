"""MonitorSuite.update_batch: the same detections and the same state as feeding the records one by one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from online_models.drift.defaults import DEFAULT_MONITORS
from online_models.drift.monitors import MonitorError, MonitorSuite, batch_signals, event_signals
from reloop.synthetic import generate


def test_batch_signals_equal_event_signals_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.random(2000), [0.0, 1.0, 0.5, 1e-9, 1 - 1e-9]])
    y = rng.integers(0, 2, len(p))
    s = batch_signals(p, y)
    for i in range(len(p)):
        e = event_signals(float(p[i]), int(y[i]))
        assert all(s[k][i] == e[k] or (math.isnan(s[k][i]) and math.isnan(e[k])) for k in e), i


@pytest.mark.parametrize("scenario", ["abrupt_ctr", "abrupt_interest"])
def test_update_batch_equals_update_one_by_one(scenario: str) -> None:
    specs = [
        *DEFAULT_MONITORS,
        {"kind": "page_hinkley", "metric": "price", "params": {"threshold": 5.0}},
        {"kind": "ks", "metric": "price", "params": {}},
        {"kind": "psi", "metric": "hour", "params": {"mode": "decay"}},
    ]
    stream = generate(scenario, n=30_000, seed=3, at=15_000)
    t = stream.table
    p, y, ts = np.asarray(stream.p_stale), t["label"].to_numpy(), t["ts"].to_numpy()
    price, hour = t["price"].to_numpy(), t["hour"].to_numpy()
    one, many = MonitorSuite.from_specs(specs, 500), MonitorSuite.from_specs(specs, 500)
    expected = []
    for i in range(len(p)):
        for det in one.update(
            float(p[i]), int(y[i]), {"price": float(price[i]), "hour": int(hour[i])}, ts=int(ts[i]), model_version="v1"
        ):
            expected.append((i, det))
    got = []
    for lo in range(0, len(p), 512):
        sl = slice(lo, lo + 512)
        got += [
            (lo + i, d)
            for i, d in many.update_batch(
                p[sl], y[sl], {"price": price[sl], "hour": hour[sl]}, ts=ts[sl], model_version="v1"
            )
        ]
    assert expected and got == expected
    assert json.dumps(one.state_dict(), sort_keys=True) == json.dumps(many.state_dict(), sort_keys=True)


def test_update_batch_counts_missing_columns_and_checks_lengths() -> None:
    suite = MonitorSuite.from_specs(
        [
            {"kind": "adwin", "metric": "click", "warmup": 0},
            {"kind": "ks", "metric": "price"},
            {"kind": "psi", "metric": "device"},
        ]
    )
    suite.update_batch(np.array([0.2, 0.4]), np.array([0, 1]), {"device": np.array(["a", "b"])})
    assert suite.missing == {"price": 2, "device": 2} and suite.n == 2
    with pytest.raises(MonitorError, match="same length"):
        suite.update_batch(np.array([0.2]), np.array([0, 1]))
