"""A short `reloop run --side-features` on the real services: the run writes its side tables as Feast batch
sources, and every version it serves (the trainer's and the retrains') reads the side attributes."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from jobs.registry import ModelRegistry
from pipelines.side_features import SIDE_BAGS, SIDE_CATEGORICAL, read_batch_sources

pytestmark = pytest.mark.integration


def test_short_side_feature_run_trains_retrains_and_serves_the_side_attributes(tmp_path, kafka_config):
    run_id = f"itest-side-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reloop.cli",
            "run",
            "--quiet",
            "--side-features",
            "--limit",
            "12000",
            "--inject-drift",
            "abrupt_inversion",
            "--feature-every",
            "2",
            "--run-id",
            run_id,
            "--reports",
            str(tmp_path / "reports"),
            "--state-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "reports" / run_id / "summary.json").read_text())
    assert summary["errors"] == [] and summary["causal_violations"] == []
    c = summary["counts"]
    assert c["examples learned"] == c["examples written"] == 12000 and c["scored"] > 0
    side = summary["side_features"]
    assert side["fields"] == list(SIDE_CATEGORICAL + SIDE_BAGS) and side["feature_service"] == "ctr_dcnv2_side_v1"
    assert side["rows"] == {"user_profile": 943, "item_catalog": 1682}
    users, items = read_batch_sources(side["batch_sources"])
    assert users.num_rows == 943 and items.num_rows == 1682
    assert "Side features" in (tmp_path / "reports" / run_id / "report.html").read_text()
    reg = ModelRegistry(str(tmp_path / "runs" / run_id / "registry"))
    entries = [reg.entry(v) for v in reg.versions()]
    assert {e.extra.get("source") for e in entries} >= {"jobs.trainer", "jobs.retrain"}  # the drift was retrained
    for e in entries:
        assert e.feature_service == "ctr_dcnv2_side_v1", e.version
        assert set(SIDE_CATEGORICAL) <= set(e.extra["encoder"]["categorical_fields"]), e.version
        assert tuple(e.extra["encoder"]["bag_fields"]) == SIDE_BAGS and e.model_config["num_bags"] == 1
