"""The deployment gate's rule on constructed prediction logs (online_models.gate)."""

from __future__ import annotations

import numpy as np
import pytest

from online_models.gate import GateError, paired_test


def _log(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p_true = rng.uniform(0.1, 0.9, n)
    return (rng.uniform(size=n) < p_true).astype(float), p_true


@pytest.mark.parametrize("seed", range(10))
def test_a_clearly_worse_candidate_is_never_promoted(seed: int) -> None:
    y, p = _log(1000, seed)
    worse = np.clip(p + np.random.default_rng(100 + seed).normal(0, 0.25, len(p)), 0.02, 0.98)
    for kind in ("refresh", "retrain"):
        d = paired_test(y, worse, p, kind, seed=seed)
        assert not d.promote and d.lo > 0 and d.n == 1000


def test_an_equal_candidate_is_promoted_as_a_refresh_and_rejected_as_a_retrain() -> None:
    y, p = _log(1000, 1)
    refresh, retrain = paired_test(y, p, p, "refresh"), paired_test(y, p, p, "retrain")
    assert refresh.promote and not retrain.promote
    assert refresh.diff == retrain.diff == 0 and refresh.lo == refresh.hi == 0


@pytest.mark.parametrize("seed", range(5))
def test_an_equally_good_but_different_model_is_a_refresh_without_evidence_against_it(seed: int) -> None:
    y, p = _log(1000, seed)
    rng = np.random.default_rng(50 + seed)
    a, b = (np.clip(p + rng.normal(0, 0.05, len(p)), 0.02, 0.98) for _ in range(2))
    # a 95 % one-sided bound: a few of many such comparisons may reject by chance, these seeds do not
    assert paired_test(y, a, b, "refresh").promote
    assert not paired_test(y, a, b, "retrain").promote


def test_a_clearly_better_candidate_passes_as_a_retrain_and_a_rollback_needs_the_same_evidence() -> None:
    y, p = _log(1000, 4)
    stale = np.full(len(p), 0.5)
    assert paired_test(y, p, stale, "retrain").promote
    assert paired_test(y, p, stale, "rollback").promote  # the previous model (p) is better
    assert not paired_test(y, stale, p, "rollback").promote  # the previous model (stale) is worse


def test_the_decision_records_n_diff_interval_and_rule() -> None:
    y, p = _log(500, 5)
    d = paired_test(y, np.full(500, 0.5), p, "retrain").to_dict()
    assert d["n"] == 500 and d["lo"] <= d["diff"] <= d["hi"] and "evidence better" in d["rule"]


def test_the_gate_refuses_what_it_cannot_judge() -> None:
    y, p = _log(500, 6)
    with pytest.raises(GateError, match="unequal"):
        paired_test(y, p[:-1], p, "refresh")
    with pytest.raises(GateError, match="at least"):
        paired_test(y[:50], p[:50], p[:50], "refresh")
    with pytest.raises(GateError, match="kind"):
        paired_test(y, p, p, "promote")


def test_a_margin_asks_a_retrain_for_a_minimum_gain() -> None:
    y, p = _log(1000, 7)
    stale = np.full(len(p), 0.5)
    assert paired_test(y, p, stale, "retrain").promote
    assert not paired_test(y, p, stale, "retrain", margin=0.99).promote
