"""Alerts of one shift form one incident; the hooks get its opening alert, not a storm."""

from __future__ import annotations

from online_models.drift.incidents import group_incidents


def test_alerts_close_together_are_one_incident_with_its_actions_and_resolution() -> None:
    alerts = [
        {"at_event": e, "ts": e, "summary": "s", "detectors": [d]}
        for e, d in (
            (1000, "adwin:logloss"),
            (3000, "page_hinkley:logloss"),
            (9000, "adwin:click"),
            (40_000, "adwin:logloss"),
        )
    ]
    actions = [
        {"what": "retrain submitted", "at_event": 3500},
        {"what": "gate", "kind": "refresh", "at_event": 3600},
        {"what": "retrain candidate promoted", "at_event": 4000, "version": "v7"},
    ]
    inc = group_incidents(alerts, actions, gap_events=10_000, end_event=45_000)
    assert [i["alerts"] for i in inc] == [3, 1]
    first = inc[0]
    assert first["status"] == "resolved" and "v7" in first["resolution"]
    assert first["evidence"] == ["adwin:logloss", "page_hinkley:logloss", "adwin:click"]
    # a routine refresh is no incident action
    assert [a["what"] for a in first["actions"]] == ["retrain submitted", "retrain candidate promoted"]
    assert inc[1]["status"] == "open" and inc[1]["resolution"] == "still open at the end of the stream"


def test_the_monitor_pages_once_per_incident(tmp_path) -> None:
    from jobs.alerts import HookDispatcher, PythonHook
    from jobs.monitor import MonitorLoop, PredictionRecord
    from online_models.drift.monitors import MonitorSuite
    from online_models.drift.policy import DriftPolicy
    from online_models.drift.records import AuditLog
    from reloop.synthetic import generate

    s = generate("abrupt_ctr", n=30_000, seed=8, at=10_000)
    y = s.table.column("label").to_numpy()
    pages: list[dict] = []
    audit = AuditLog(tmp_path / "audit.jsonl")
    specs = [
        {"kind": "adwin", "metric": "logloss"},
        {"kind": "page_hinkley", "metric": "logloss"},
        {"kind": "adwin", "metric": "click"},
    ]
    loop = MonitorLoop(
        MonitorSuite.from_specs(specs),
        DriftPolicy(cooldown_events=2000),
        HookDispatcher([PythonHook(pages.append)]),
        None,
        audit,
    )
    for i in range(30_000):
        loop.process(PredictionRecord(f"e{i}", i, None, None, float(s.p_stale[i]), int(y[i]), "v1"))
    raw = [r for r in audit.read() if r.kind == "alert"]
    opened = [p for p in pages if p.get("incident", {}).get("status") == "opened"]
    assert len(raw) >= 2 and len(opened) == len(loop.incidents.incidents) < len(raw)
    # every page names its incident; alerts that only alert (no action) inside an open incident stay in the audit
    assert all("incident" in p for p in pages)
    assert all(p["action"] != "alert" for p in pages if p["incident"]["status"] == "updated")
