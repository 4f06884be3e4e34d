"""The label-free estimate: exact expected AUC / logloss, calibration, and the monitor's band."""

from __future__ import annotations

import itertools

import numpy as np

from online_models.cbpe import CBPEMonitor, PlattCalibrator, expected_auc, expected_logloss
from online_models.metrics import auc, logloss


def test_expected_auc_equals_the_brute_force_sum_with_ties():
    rng = np.random.default_rng(0)
    p, s = rng.random(60), np.round(rng.random(60), 1)
    num = den = 0.0
    for i, j in itertools.permutations(range(60), 2):
        w = p[i] * (1 - p[j])
        den += w
        num += w * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    assert abs(expected_auc(p, s) - num / den) < 1e-12
    assert np.isnan(expected_auc(np.array([0.3])))


def test_with_calibrated_probabilities_the_estimate_matches_the_realised_metric():
    rng = np.random.default_rng(1)
    gaps_auc, gaps_ll = [], []
    for _ in range(20):
        p = 1 / (1 + np.exp(-rng.normal(-1, 1.5, 5000)))
        y = (rng.random(5000) < p).astype(int)
        gaps_auc.append(expected_auc(p) - auc(y, p))
        gaps_ll.append(expected_logloss(p) - logloss(y, p))
    assert abs(np.mean(gaps_auc)) < 0.005 and abs(np.mean(gaps_ll)) < 0.005


def test_platt_calibration_fixes_an_overconfident_model():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1, 20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-z))).astype(int)
    over = 1 / (1 + np.exp(-(3 * z + 1)))  # overconfident and biased
    cal = PlattCalibrator().fit(over, y)
    assert abs(cal.a - 1 / 3) < 0.05 and abs(cal.b + 1 / 3) < 0.05
    assert abs(expected_logloss(cal(over)) - logloss(y, cal(over))) < 0.01
    assert abs(expected_logloss(over) - logloss(y, over)) > 0.05


def test_monitor_alarms_outside_the_reference_band_only():
    m = CBPEMonitor(k=3).fit([0.75, 0.76, 0.74, 0.75, 0.755])
    assert m.update(float("nan")) is False
    assert [m.update(x) for x in (0.75, 0.748, 0.70, 0.76, 0.80)] == [False, False, True, False, False]
    assert m.alarms == [3]
    both = CBPEMonitor(k=3, two_sided=True).fit([0.75, 0.76, 0.74, 0.75, 0.755])
    assert [both.update(x) for x in (0.70, 0.80)] == [True, True]
    assert CBPEMonitor().update(0.1) is False  # no reference yet: no opinion


def test_estimate_over_time_never_uses_a_chunks_own_labels():
    from online_models.cbpe import estimate_over_time

    rng = np.random.default_rng(3)
    n = 6000
    ts = np.arange(n) * 1000
    p = 1 / (1 + np.exp(-rng.normal(-0.5, 1.2, n)))
    y = (rng.random(n) < p).astype(int)
    lts = ts + 3_600_000
    a = estimate_over_time(p, ts, y, lts, start=1000, chunk=1000, calibration_window=2000)
    y2 = y.copy()
    y2[3000:4000] = 1 - y2[3000:4000]  # a chunk's own outcomes change: its estimate does not
    b = estimate_over_time(p, ts, y2, lts, start=1000, chunk=1000, calibration_window=2000)
    i = [r["lo"] for r in a["chunks"]].index(3000)
    assert a["chunks"][i]["expected_auc"] == b["chunks"][i]["expected_auc"]
    assert a["chunks"][i]["realised_auc"] != b["chunks"][i]["realised_auc"]
    assert a["mae_auc"] < 0.03 and a["pending_chunks"] == len(a["chunks"])
