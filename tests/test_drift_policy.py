"""The policy decides: minimum evidence, cooldown, hysteresis, and the rollback watch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from online_models.drift.policy import DriftPolicy
from online_models.drift.records import Detection


def det(name: str, i: int, level: str = "drift", family: str = "performance") -> Detection:
    return Detection(name, name.split(":")[-1], level, 1.0, 0.5, 100, i - 100, i, i, family)


def actions(reqs):
    return [(r.action, r.level) for r in reqs]


def test_min_evidence_needs_distinct_performance_monitors_within_the_window():
    pol = DriftPolicy(min_evidence=2, evidence_window=1000, cooldown_events=5000)
    assert actions(pol.step(100, [det("adwin:logloss", 100)])) == [("alert", "drift")]
    # the same monitor again is not new evidence
    assert pol.step(200, [det("adwin:logloss", 200)]) == []
    assert pol.state == "warning"
    # a second monitor, but too late: the first one's evidence has expired
    pol2 = DriftPolicy(min_evidence=2, evidence_window=1000)
    pol2.step(100, [det("adwin:logloss", 100)])
    assert [r.action for r in pol2.step(1200, [det("page_hinkley:logloss", 1200)])] != ["retrain"]
    assert pol2.state != "drift"
    # in time: retrain
    assert actions(pol.step(600, [det("page_hinkley:logloss", 600)])) == [("retrain", "drift")]
    assert pol.state == "drift"


def test_min_evidence_one_retrains_at_once():
    pol = DriftPolicy(min_evidence=1)
    assert [r.action for r in pol.step(10, [det("adwin:logloss", 10)])] == ["retrain"]


def test_distribution_tests_alone_only_alert():
    pol = DriftPolicy(min_evidence=1, cooldown_events=1000)
    reqs = pol.step(10, [det("psi:prediction", 10, family="distribution"), det("ks:x", 10, family="distribution")])
    assert actions(reqs) == [("alert", "drift")]
    assert "distribution shift" in reqs[0].reason
    # rate-limited: no second alert within the cooldown, one after it
    assert pol.step(500, [det("psi:prediction", 500, family="distribution")]) == []
    assert actions(pol.step(1500, [det("psi:prediction", 1500, family="distribution")])) == [("alert", "drift")]


def test_cooldown_blocks_a_second_retrain_but_alerts_once():
    pol = DriftPolicy(min_evidence=1, cooldown_events=5000, clear_after=100)
    assert [r.action for r in pol.step(0, [det("adwin:logloss", 0)])] == ["retrain"]
    pol.step(200, [])  # a quiet spell clears the state (clear_after=100)...
    assert pol.state == "stable"
    reqs = pol.step(300, [det("adwin:logloss", 300)])  # ...but the cooldown still holds
    assert [r.action for r in reqs] == ["alert"] and "cooldown" in reqs[0].reason
    pol.step(400, [])
    assert pol.step(500, [det("adwin:logloss", 500)]) == [], "at most one cooldown alert per cooldown"
    pol.step(5200, [])
    assert [r.action for r in pol.step(5300, [det("adwin:logloss", 5300)])] == ["retrain"]


def test_hysteresis_one_warning_alert_per_episode_and_quiet_spell_to_clear():
    pol = DriftPolicy(min_evidence=2, clear_after=1000)
    w = lambda i: det("ddm:error", i, level="warning")  # noqa: E731
    assert actions(pol.step(10, [w(10)])) == [("alert", "warning")]
    for i in range(20, 900, 50):  # warnings keep coming: no flapping, no re-alert
        assert pol.step(i, [w(i)]) == []
    assert pol.state == "warning"
    pol.step(1500, [])
    assert pol.state == "warning", "not yet 1000 quiet events since the last warning at 870"
    pol.step(1900, [])
    assert pol.state == "stable"
    assert actions(pol.step(2000, [w(2000)])) == [("alert", "warning")], "a new episode alerts again"


def test_alert_on_warning_can_be_switched_off():
    pol = DriftPolicy(alert_on_warning=False)
    assert pol.step(10, [det("ddm:error", 10, level="warning")]) == []


def test_drift_that_outlives_the_cooldown_asks_again():
    pol = DriftPolicy(min_evidence=1, cooldown_events=1000, clear_after=10_000)
    assert [r.action for r in pol.step(0, [det("adwin:logloss", 0)])] == ["retrain"]
    assert pol.step(500, [det("adwin:logloss", 500)]) == []
    reqs = pol.step(1500, [det("adwin:logloss", 1500)])
    assert [r.action for r in reqs] == ["retrain"] and "persists" in reqs[0].reason


def test_drift_state_holds_until_quiet():
    pol = DriftPolicy(min_evidence=1, cooldown_events=400, clear_after=500)
    assert [r.action for r in pol.step(0, [det("adwin:logloss", 0)])] == ["retrain"]
    assert pol.step(100, [det("adwin:logloss", 100)]) == [], "still the same episode"
    pol.step(700, [])
    assert [r.action for r in pol.step(800, [det("adwin:logloss", 800)])] == ["retrain"]


def _watch(pol, new_losses, old_losses=None, start=0):
    reqs = []
    for k, loss in enumerate(new_losses):
        old = None if old_losses is None else old_losses[k]
        reqs += pol.observe_loss(start + k, float(loss), None if old is None else float(old))
    return reqs


def test_rollback_when_the_new_model_is_worse_than_the_old_baseline():
    rng = np.random.default_rng(0)
    pol = DriftPolicy(rollback_margin=0.02, watch_min_events=500, watch_events=5000)
    pol.start_watch(0, "v2", "v1", baseline_loss=0.30)
    reqs = _watch(pol, rng.exponential(0.36, 3000))
    assert [(r.action, r.target_version, r.model_version) for r in reqs] == [("rollback", "v1", "v2")]
    assert reqs[0].metrics["live_logloss_new"] > reqs[0].metrics["reference_logloss"]
    assert reqs[0].metrics["events"] >= 500, "never before the minimum evidence"
    assert pol.watch is None


def test_no_rollback_when_the_new_model_is_as_good_and_the_watch_passes():
    rng = np.random.default_rng(1)
    pol = DriftPolicy(rollback_margin=0.02, watch_min_events=500, watch_events=4000)
    pol.start_watch(0, "v2", "v1", baseline_loss=0.30)
    assert _watch(pol, rng.exponential(0.30, 4000)) == []
    assert pol.watch is None, "passed after watch_events"


def test_paired_shadow_loss_beats_a_stale_baseline():
    """After a drift the old baseline is optimistic; the old model's shadow loss on the same events is fair."""
    rng = np.random.default_rng(2)
    pol = DriftPolicy(rollback_margin=0.02, watch_min_events=500, watch_events=3000)
    pol.start_watch(0, "v2", "v1", baseline_loss=0.20)  # measured before the world got harder
    new = rng.exponential(0.40, 3000)
    old = new * 1.2  # the old model does worse on the very same events
    assert _watch(pol, new, old) == []


def test_rollback_needs_more_than_noise():
    pol = DriftPolicy(rollback_margin=0.0, rollback_z=3.0, watch_min_events=10, watch_events=50)
    pol.start_watch(0, "v2", "v1", baseline_loss=0.30)
    rng = np.random.default_rng(3)
    assert _watch(pol, rng.exponential(0.31, 50)) == [], "1/30 above with 50 noisy samples: not significant"


def test_policy_state_round_trips_through_json():
    pol = DriftPolicy(min_evidence=2)
    pol.step(10, [det("adwin:logloss", 10)])
    pol.start_watch(20, "v2", "v1", 0.3)
    pol.observe_loss(21, 0.5)
    other = DriftPolicy(min_evidence=2)
    other.load_state_dict(json.loads(json.dumps(pol.state_dict(), allow_nan=False)))
    assert other.state_dict() == pol.state_dict()
    with pytest.raises(ValueError, match="bad policy state"):
        other.load_state_dict({**pol.state_dict(), "state": "panic"})


def test_bad_policy_config():
    with pytest.raises(ValueError, match="min_evidence"):
        DriftPolicy(min_evidence=0)
