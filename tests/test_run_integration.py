"""A short `reloop run` on the real services: every stage's counts agree in summary.json."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.integration


def run_cli(tmp_path, *args: str) -> dict:
    run_id = f"itest-{uuid.uuid4().hex[:8]}"  # run ids name Kafka topics: unique per test run
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reloop.cli",
            "run",
            "--quiet",
            "--feature-every",
            "2",
            "--run-id",
            run_id,
            "--reports",
            str(tmp_path / "reports"),
            "--state-dir",
            str(tmp_path / "runs"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "reports" / run_id / "summary.json").read_text())


def test_short_run_counts_agree_and_report_is_written(tmp_path, kafka_config):
    summary = run_cli(tmp_path, "--limit", "12000")
    c = summary["counts"]
    assert c["events in dataset"] == c["replayed"] == 12000
    assert c["replayed"] == c["consumed"] == c["committed offsets"] == c["parsed"] + c["dead-lettered"]
    assert c["parsed"] == c["featurised (accepted)"] + c["late"] + c["duplicates"]
    assert c["examples learned"] == c["examples written"] == c["featurised (accepted)"]
    assert c["scored"] + c["arrived before the first model"] == c["examples written"]
    assert c["model versions served"] >= 1
    assert summary["variants"]["served"]["n"] == c["scored"] > 0
    assert summary["errors"] == []
    # one causal clock: every served version learned only events before the first one it served
    served = [v for v in summary["versions"] if v["first_served_ts"] is not None]
    assert served and all(v["trained_until_ts"] < v["first_served_ts"] for v in served)
    assert summary["causal_violations"] == []
    # the trainer's checkpoints reach serving through the gate, each decision with its n and interval
    assert c["model versions served"] >= 2 and summary["gate"]
    assert all(g["lo"] <= g["diff"] <= g["hi"] and g["n"] >= 500 for g in summary["gate"])
    assert {"incidents", "rollbacks"} <= set(c) and c["predictions published"] == c["scored"]
    assert {"p50", "p99"} <= set(summary["freshness"]["events"])
    for name in ("report.html", "metrics_over_time.png", "memory_gain.png", "throughput.png"):
        assert (tmp_path / "reports" / summary["run_id"] / name).stat().st_size > 0


def test_short_run_with_delayed_labels_joins_serves_at_impression_time_and_estimates(tmp_path, kafka_config):
    summary = run_cli(tmp_path, "--limit", "12000", "--label-delay", "exp:20m", "--attribution-window", "1h")
    c = summary["counts"]
    assert summary["errors"] == []
    assert c["events in dataset"] == c["replayed"] == c["join: impressions accepted"] == 12000
    assert c["consumed"] == c["committed offsets"] == 12000 + c["join: feedback accepted"] + c["join: late feedback"]
    # one example per impression whose window closed (or whose click came): none twice, none lost
    assert c["examples written"] == c["join: positives"] + c["join: negatives"] <= 12000
    assert c["examples learned"] == c["examples written"]
    assert c["scored"] + c["arrived before the first model"] == c["examples written"]
    assert c["join: late feedback"] > 0 and c["join: orphan feedback"] == 0
    # a version knows up to the newest label it learned, and serves only impressions after that
    served = [v for v in summary["versions"] if v["first_served_ts"] is not None]
    assert served and all(v["trained_until_ts"] < v["first_served_ts"] for v in served)
    assert summary["causal_violations"] == []
    est = summary["label_delay"]["label_free"]
    assert est["chunks"] and 0 <= est["mae_auc"] < 0.2 and 0 <= est["mae_logloss"] < 0.2
    html = (tmp_path / "reports" / summary["run_id"] / "report.html").read_text()
    assert "Label-free estimate" in html
