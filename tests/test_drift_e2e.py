"""End to end on the real services: an injected abrupt shift in MovieLens-100K is detected, a retrain runs
on Ray (TorchTrainer), the candidate is gated, promoted, served, and the served AUC recovers; and with a
gate no candidate can pass, nothing is promoted."""

from __future__ import annotations

import json
import uuid
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(tmp_path, name: str, *extra: str) -> dict:
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"  # run ids name Kafka topics: unique per test run
    proc = subprocess.run(
        [sys.executable, "-m", "reloop.cli", "run", "--quiet", "--limit", "40000", "--inject-drift",
         "abrupt_interest", "--drift-at", "0.5", "--no-refresh", "--run-id", run_id,
         "--reports", str(tmp_path / "reports"), "--state-dir", str(tmp_path / "runs"), *extra],
        capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "reports" / run_id / "summary.json").read_text())


def audit(tmp_path, summary: dict) -> list[dict]:
    path = tmp_path / "runs" / summary["run_id"] / "monitor" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_shift_alert_retrain_gate_promote_serve_recover(tmp_path, kafka_config):
    s = run(tmp_path, "e2e")
    shift_ts = s["shift"]["start_ts"]
    after = [a for a in s["alerts"] if a["ts"] >= shift_ts - 3_600_000]
    assert after, f"no alert around or after the shift: {s['alerts']}"
    retrain_after = [a for a in after if a["action"] == "retrain"]
    assert retrain_after, f"no retrain requested after the shift: {after}"
    promoted = [v for v in s["versions"] if v["ts"] >= shift_ts and v["reason"].startswith("retrain")]
    assert promoted, f"no retrained version served after the shift: {s['versions']}"
    # the audit trail has every step, in order, for that retrain
    kinds = [r["kind"] for r in audit(tmp_path, s)]
    for step in ("alert", "retrain_requested", "candidate_evaluated", "promoted", "watch_started"):
        assert step in kinds, kinds
    assert kinds.index("retrain_requested") < kinds.index("candidate_evaluated") < kinds.index("promoted")
    # serving AUC between the shift and the new version vs after it
    ot = s["over_time"]["served"]
    ts, aucs = np.array(ot["ts"]), np.array([np.nan if a is None else a for a in ot["auc"]])
    hit = (ts >= shift_ts) & (ts < promoted[0]["ts"])
    recovered = ts > promoted[0]["ts"]
    assert hit.any() and recovered.any()
    assert np.nanmean(aucs[recovered]) > np.nanmean(aucs[hit]) + 0.02, (aucs[hit], aucs[recovered])
    assert s["errors"] == []


def test_no_candidate_passes_an_impossible_gate(tmp_path, kafka_config):
    s = run(tmp_path, "gate", "--gate-margin", "0.99")
    kinds = [r["kind"] for r in audit(tmp_path, s)]
    assert "candidate_evaluated" in kinds and "not_promoted" in kinds
    assert "promoted" not in kinds
    assert [v["reason"] for v in s["versions"]] == ["bootstrap: first incremental checkpoint"]
