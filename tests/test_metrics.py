"""Streaming metrics against scikit-learn and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from online_models.metrics import BinnedAUC, SlotMetrics, auc, gauc, logloss


def test_auc_and_logloss_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500), 2)  # rounding makes ties
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert logloss(y, p) == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), abs=1e-9)
    b = BinnedAUC(bins=100_000)
    b.update(y[:200], p[:200])
    b.update(y[200:], p[200:])
    assert b.value() == pytest.approx(roc_auc_score(y, p), abs=1e-3)


def test_gauc_weights_users_by_impressions_and_skips_single_class_users() -> None:
    y = [1, 0, 0, 1, 0, 0, 1, 1]
    p = [0.9, 0.1, 0.2, 0.1, 0.5, 0.3, 0.5, 0.5]
    g = ["a", "a", "b", "b", "b", "b", "c", "c"]
    # a: AUC 1 (2 impressions); b: positive 0.1 below all negatives -> AUC 0 (4 impressions); c: one class
    assert gauc(y, p, g) == pytest.approx((2 * 1.0 + 4 * 0.0) / 6)
    assert np.isnan(gauc([1, 1], [0.2, 0.3], ["a", "b"]))


def test_slot_metrics_per_slot_and_overall() -> None:
    m = SlotMetrics()
    m.update([0, 1], [0.1, 0.9], ["u", "u"])
    m.update([1], [0.8], ["v"])
    first = m.end_slot()
    m.update([0, 1], [0.7, 0.2], ["w", "w"])
    second = m.end_slot()
    r = m.result()
    assert first["n"] == 3 and first["auc"] == 1.0 and second["auc"] == 0.0
    assert r["n"] == 5 and len(r["slots"]) == 2
    assert r["auc"] == pytest.approx(roc_auc_score([0, 1, 1, 0, 1], [0.1, 0.9, 0.8, 0.7, 0.2]))
    with pytest.raises(ValueError, match="probabilities"):
        m.update([1], [1.5], ["x"])


def test_undefined_metrics_are_null_not_nan() -> None:
    m = SlotMetrics()
    m.update([1, 1], [0.5, 0.6], ["u", "u"])
    assert m.end_slot()["auc"] is None
