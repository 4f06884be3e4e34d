"""The monitor loop with a fake job layer: retrain -> gate -> promote -> watch -> rollback, all audited."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.alerts import HookDispatcher, PythonHook
from jobs.monitor import Candidate, Evaluation, MonitorLoop, PredictionRecord, load_state, parse_prediction, save_state
from online_models.drift.monitors import MonitorSuite
from online_models.drift.policy import DriftPolicy
from online_models.drift.records import AuditLog
from reloop.synthetic import generate

SPECS = [
    {"kind": "adwin", "metric": "logloss", "params": {"delta": 0.0001}},
    {"kind": "page_hinkley", "metric": "logloss", "params": {"threshold": 100.0, "delta": 0.02, "mode": "up"}},
]


class FakeActions:
    """The job layer: a registry pointer and a gate whose verdict the test chooses."""

    def __init__(self, better: bool = True, fail: str | None = None) -> None:
        self.current, self.better, self.fail = "v1", better, fail
        self.calls: list[tuple] = []

    def request_retrain(self, request):
        self.calls.append(("request_retrain", request.action))
        if self.fail == "request_retrain":
            raise RuntimeError("ray is down")
        return Candidate("v2", job_id="raysubmit_1", metrics={"train_logloss": 0.4})

    def evaluate_candidate(self, candidate, current_version):
        self.calls.append(("evaluate_candidate", candidate.version, current_version))
        cand, cur = (0.40, 0.49) if self.better else (0.52, 0.49)
        return Evaluation(self.better, {"logloss": cand}, {"logloss": cur}, "holdout slot of the last 2000 events")

    def promote(self, candidate):
        self.calls.append(("promote", candidate.version))
        self.current = candidate.version
        return candidate.version

    def rollback(self, to_version, from_version):
        self.calls.append(("rollback", to_version, from_version))
        self.current = to_version
        return to_version


def run(actions, *, new_model_bad=False, n=30_000, at=10_000, tmp_path, shadow=False):
    """Serve an abrupt CTR shift: v1 = stale model; v2 = the retrained model (knows the new concept),
    or a broken one (new_model_bad) that predicts far too high."""
    s = generate("abrupt_ctr", n=n, seed=8, at=at)
    y, ts = s.table.column("label").to_numpy(), s.table.column("ts").to_numpy()
    received: list[dict] = []
    audit = AuditLog(tmp_path / "audit.jsonl")
    loop = MonitorLoop(
        MonitorSuite.from_specs(SPECS),
        DriftPolicy(watch_min_events=1000, watch_events=5000),
        HookDispatcher([PythonHook(received.append, accepts_records=True)]),
        actions,
        audit,
    )
    for i in range(n):
        v = actions.current
        if v == "v1":
            p, prev = s.p_stale[i], None
        else:
            p = min(0.9, s.p_true[i] * 3) if new_model_bad else s.p_true[i]
            prev = s.p_stale[i] if shadow else None
        loop.process(PredictionRecord(f"e{i}", int(ts[i]), "u", "i", float(p), int(y[i]), v, p_prev=prev))
    return loop, [r.kind for r in audit.read()], received


def test_retrain_gate_promote_then_watch_passes(tmp_path):
    acts = FakeActions(better=True)
    loop, kinds, received = run(acts, tmp_path=tmp_path)
    assert [c[0] for c in acts.calls] == ["request_retrain", "evaluate_candidate", "promote"]
    order = [
        "alert",
        "retrain_requested",
        "retrain_submitted",
        "candidate_evaluated",
        "promoted",
        "watch_started",
        "watch_passed",
    ]
    it = iter(kinds)
    assert all(k in it for k in order), f"{order} must happen in this order within {kinds}"
    assert "rolled_back" not in kinds and loop.current_version == "v2"
    # every audit record and the alert went to the hooks that take records (e.g. the Kafka topic)
    assert any(r["type"] == "alert" and r["action"] == "retrain" for r in received)
    assert {r.get("kind") for r in received if r.get("type") == "audit"} >= {"promoted", "candidate_evaluated"}
    promoted = next(json.loads(x) for x in open(tmp_path / "audit.jsonl") if '"promoted"' in x)
    assert promoted["versions"] == {"current": "v2", "previous": "v1"}
    assert promoted["metrics"]["candidate_logloss"] < promoted["metrics"]["current_logloss"]


def test_worse_candidate_is_not_promoted(tmp_path):
    acts = FakeActions(better=False)
    loop, kinds, _ = run(acts, tmp_path=tmp_path, n=16_000)
    assert ("promote", "v2") not in acts.calls and acts.current == "v1"
    assert "not_promoted" in kinds and "promoted" not in kinds


def test_worse_live_model_is_rolled_back(tmp_path):
    acts = FakeActions(better=True)
    loop, kinds, received = run(acts, tmp_path=tmp_path, new_model_bad=True, shadow=True)
    assert acts.calls[-1] == ("rollback", "v1", "v2") and acts.current == "v1"
    assert kinds.index("promoted") < kinds.index("rolled_back")
    rb = [r for r in loop.requests if r.action == "rollback"]
    assert len(rb) == 1 and rb[0].metrics["live_logloss_new"] > rb[0].metrics["reference_logloss"]
    assert any(r.get("type") == "alert" and r["action"] == "rollback" for r in received)


def test_failing_action_is_audited_and_monitoring_continues(tmp_path):
    acts = FakeActions(fail="request_retrain")
    loop, kinds, _ = run(acts, tmp_path=tmp_path, n=16_000)
    assert loop.n == 16_000 and "action_failed" in kinds and "promoted" not in kinds


def test_without_actions_the_loop_only_alerts(tmp_path):
    class NoActions(FakeActions):
        pass

    acts = NoActions()
    s = generate("abrupt_ctr", n=16_000, seed=8, at=8000)
    loop = MonitorLoop(
        MonitorSuite.from_specs(SPECS), DriftPolicy(), HookDispatcher([]), None, AuditLog(tmp_path / "a.jsonl")
    )
    y = s.table.column("label").to_numpy()
    for i in range(16_000):
        loop.process(PredictionRecord(f"e{i}", i, None, None, float(s.p_stale[i]), int(y[i]), "v1"))
    kinds = [r.kind for r in AuditLog(tmp_path / "a.jsonl").read()]
    assert "retrain_requested" in kinds and "retrain_submitted" not in kinds and acts.calls == []


def test_loop_checkpoint_round_trip(tmp_path):
    s = generate("stable", n=3000, seed=1)
    y = s.table.column("label").to_numpy()
    mk = lambda: MonitorLoop(MonitorSuite.from_specs(SPECS), DriftPolicy(), HookDispatcher([]))  # noqa: E731
    a = mk()
    for i in range(3000):
        a.process(PredictionRecord(f"e{i}", i, None, None, float(s.p_stale[i]), int(y[i]), "v1", features={}))
    save_state(a, tmp_path / "state.json")
    b = mk()
    assert load_state(b, tmp_path / "state.json")
    assert b.state_dict() == a.state_dict()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_state(mk(), tmp_path / "bad.json")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "not JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"event_id": "e", "ts": 1, "label": 1}', "missing field(s): p"),
        (b'{"event_id": "e", "ts": 1, "label": 1, "p": 1.5}', "probability"),
        (b'{"event_id": "e", "ts": 1, "label": 2, "p": 0.5}', "label must be 0 or 1"),
        (b'{"event_id": "e", "ts": -5, "label": 1, "p": 0.5}', "ts must be"),
        (b'{"event_id": "e", "ts": 1, "label": 1, "p": NaN}', "probability"),
    ],
)
def test_bad_prediction_records_are_rejected_with_a_reason(raw, reason):
    out = parse_prediction(raw)
    assert isinstance(out, str) and reason in out


def test_prediction_record_features():
    rec = parse_prediction(
        json.dumps(
            {
                "event_id": "e",
                "ts": 5,
                "label": 0,
                "p": 0.2,
                "p_base": 0.25,
                "model_version": 3,
                "item_pop": 1.5,
                "device": "web",
                "flag": True,
                "features": {"price": 9.5},
            }
        )
    )
    assert rec.features == {"item_pop": 1.5, "price": 9.5} and rec.model_version == "3" and rec.p_base == 0.25
    assert np.isclose(rec.p, 0.2)


def test_asynchronous_candidate_is_gated_on_the_loop_thread(tmp_path):
    import threading

    class AsyncActions(FakeActions):
        def __init__(self):
            super().__init__()
            self.loop = None

        def request_retrain(self, request):
            self.calls.append(("request_retrain", request.action))
            # a "Ray job watcher" finishes later on another thread
            threading.Timer(0.01, self.loop.candidate_ready, args=(Candidate("v2", job_id="raysubmit_9"),)).start()
            return None

    acts = AsyncActions()
    audit = AuditLog(tmp_path / "audit.jsonl")
    loop = MonitorLoop(MonitorSuite.from_specs(SPECS), DriftPolicy(), HookDispatcher([]), acts, audit)
    acts.loop = loop
    s = generate("abrupt_ctr", n=16_000, seed=8, at=8000)
    y = s.table.column("label").to_numpy()
    import time

    for i in range(16_000):
        loop.process(PredictionRecord(f"e{i}", i, None, None, float(s.p_stale[i]), int(y[i]), acts.current))
        if acts.calls and acts.current == "v1" and len(acts.calls) == 1:
            time.sleep(0.02)  # let the timer thread hand the candidate over
    assert [c[0] for c in acts.calls] == ["request_retrain", "evaluate_candidate", "promote"]
    kinds = [r.kind for r in audit.read()]
    assert kinds.index("retrain_submitted") < kinds.index("candidate_evaluated") < kinds.index("promoted")


@pytest.mark.parametrize("bad", [False, True])
def test_a_batch_gives_what_its_records_one_by_one_give(tmp_path, bad):
    """``process_batch`` (what serving calls, arrays per batch) against ``process`` per record on the same
    stream and the same version per batch: the same requests at the same events, the same audit trail and hook
    deliveries (alerts, retrain, gate, promotion, watch, rollback, incidents) and the same monitor state."""
    s = generate("abrupt_ctr", n=30_000, seed=8, at=10_000)
    y, ts = s.table.column("label").to_numpy(), s.table.column("ts").to_numpy()

    def serve(batched: bool, where):
        acts, received = FakeActions(better=True), []
        audit = AuditLog(where / "audit.jsonl")
        loop = MonitorLoop(
            MonitorSuite.from_specs(SPECS),
            DriftPolicy(watch_min_events=1000, watch_events=5000),
            HookDispatcher([PythonHook(received.append, accepts_records=True)]),
            acts,
            audit,
            incident_gap_events=3000,
        )
        for lo in range(0, len(y), 256):
            sl = slice(lo, lo + 256)
            v = acts.current  # the version is the batch's, as serving's lineage is
            if v == "v1":
                p, prev = s.p_stale[sl], None
            else:
                p = np.minimum(0.9, s.p_true[sl] * 3) if bad else s.p_true[sl]
                prev = s.p_stale[sl]
            if batched:
                loop.process_batch(ts[sl], np.asarray(p, float), y[sl], v, prev)
            else:
                for j in range(len(p)):
                    rec = PredictionRecord(
                        "e",
                        int(ts[sl][j]),
                        "u",
                        "i",
                        float(p[j]),
                        int(y[sl][j]),
                        v,
                        p_prev=float(prev[j]) if prev is not None else None,
                    )
                    loop.process(rec)
        drop = {"id", "at", "created_at", "ts_wall", "alert_id", "time", "correlation_id"}
        clean = lambda d: {k: (clean(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in drop}  # noqa: E731
        return loop, [clean(r.to_dict()) for r in audit.read()], [clean(r) for r in received], acts.calls

    (a, audit_a, hooks_a, calls_a) = serve(False, tmp_path / "one")
    (b, audit_b, hooks_b, calls_b) = serve(True, tmp_path / "batch")
    assert [(r.action, r.index) for r in a.requests] == [(r.action, r.index) for r in b.requests]
    assert len(a.requests) >= 2 and ("rolled_back" in [r["kind"] for r in audit_a]) == bad
    assert "incident_resolved" in [r["kind"] for r in audit_a]
    assert audit_a == audit_b and hooks_a == hooks_b and calls_a == calls_b
    assert a.n == b.n == len(y)
    assert json.dumps(a.state_dict(), sort_keys=True, default=str) == json.dumps(
        b.state_dict(), sort_keys=True, default=str
    )
