"""End to end on the real services: an injected abrupt shift in MovieLens-100K (tastes invert) is detected,
a retrain runs on Ray (TorchTrainer), the candidate is gated and promoted (or a worse model rolled back),
the served version changes, and the served AUC recovers from its drop; and with a gate no candidate can
pass, nothing is promoted."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(tmp_path, name: str, *extra: str) -> dict:
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"  # run ids name Kafka topics: unique per test run
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reloop.cli",
            "run",
            "--quiet",
            "--limit",
            "40000",
            "--inject-drift",
            "abrupt_inversion",
            "--drift-at",
            "0.5",
            "--no-refresh",
            "--run-id",
            run_id,
            "--reports",
            str(tmp_path / "reports"),
            "--state-dir",
            str(tmp_path / "runs"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "reports" / run_id / "summary.json").read_text())


def audit(tmp_path, summary: dict) -> list[dict]:
    path = tmp_path / "runs" / summary["run_id"] / "monitor" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_shift_alert_retrain_gate_promote_serve_recover(tmp_path, kafka_config):
    s = run(tmp_path, "e2e")
    shift_ts = s["shift"]["start_ts"]
    after = [a for a in s["alerts"] if a["ts"] >= shift_ts]
    assert after, f"no alert after the shift: {s['alerts']}"
    assert any(a["action"] == "retrain" for a in after), f"no retrain requested after the shift: {after}"
    changed = [v for v in s["versions"] if v["ts"] >= shift_ts]
    assert changed, f"the served version never changed after the shift: {s['versions']}"
    assert any(v["reason"].startswith("retrain") for v in s["versions"]), s["versions"]
    # the audit trail has every step, in order
    kinds = [r["kind"] for r in audit(tmp_path, s)]
    for step in ("alert", "retrain_requested", "retrain_submitted", "candidate_evaluated", "promoted", "watch_started"):
        assert step in kinds, kinds
    assert kinds.index("retrain_requested") < kinds.index("candidate_evaluated") < kinds.index("promoted")
    # every promotion was judged afterwards against the model it replaced, on the same events
    assert all({"auc_new", "auc_previous", "logloss_new", "logloss_previous"} <= set(p) for p in s["promotions"])
    # the served AUC drops at the shift and recovers
    ot = s["over_time"]["served"]
    post = [a for t, a in zip(ot["ts"], ot["auc"]) if t >= shift_ts and a is not None]
    pre = [a for t, a in zip(ot["ts"], ot["auc"]) if t < shift_ts and a is not None]
    assert post[0] < sum(pre) / len(pre) - 0.05, (pre, post)
    assert sum(post[2:]) / len(post[2:]) > post[0] + 0.03, post
    assert s["errors"] == []


def test_no_candidate_passes_an_impossible_gate(tmp_path, kafka_config):
    s = run(tmp_path, "gate", "--gate-margin", "0.99")
    kinds = [r["kind"] for r in audit(tmp_path, s)]
    assert "candidate_evaluated" in kinds and "not_promoted" in kinds
    assert "promoted" not in kinds
    assert [v["reason"] for v in s["versions"]] == ["bootstrap: first incremental checkpoint"]
