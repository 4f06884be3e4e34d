"""The contract-v2 join on the local Flink job server (portable runner, parallelism 2): the same joined
examples as the pandas recomputation, also after a SIGKILL between the sinks and the commit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.flink_support import flink_args, flink_job_endpoint  # noqa: F401
from tests.test_join_integration import REPO, check_against_pandas, replay_v2, v2_config

pytestmark = pytest.mark.integration


def test_join_on_flink_equals_pandas_after_a_sigkill(tmp_path, kafka_config, unique_topic, flink_job_endpoint):
    from pipelines.feature_job import run_join_once
    from reloop.datasets import load_dataset

    table = load_dataset("movielens-100k", limit=12_000)
    cfg = v2_config(tmp_path, kafka_config, unique_topic, max_events_per_run=5_000)
    config_file = tmp_path / "reloop.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    replay_v2(table, cfg)
    args = flink_args(flink_job_endpoint)
    assert run_join_once(cfg, pipeline_args=args, repo_path=cfg.feast.repo_path).committed
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.feature_job",
            "--once",
            "--config",
            str(config_file),
            "--feature_repo",
            cfg.feast.repo_path,
            "--attribution-window",
            "1h",
            *args,
        ],
        cwd=REPO,
        env={**os.environ, "RELOOP_FAULT": "before_commit"},
        capture_output=True,
        timeout=900,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    while run_join_once(cfg, pipeline_args=args, repo_path=cfg.feast.repo_path).committed:
        pass
    state, _ = check_against_pandas(cfg, table, n_sample=100)
    assert state.counts["impressions_accepted"] == 12_000
