"""The feature job on a real distributed runner: Beam's portable runner on an embedded Flink (one JVM).

- The same replayed events (two micro-batches, valid and malformed) through the job on FnApiRunner and
  on local Flink (parallelism 2) give identical training examples and identical Feast features, online
  and offline, and the same counters.
- Kill-and-rerun on Flink: the job process is SIGKILLed between the sinks and the offset commit (the
  ``RELOOP_FAULT=before_commit`` hook) and, separately, while the Flink job is running; each rerun
  leaves exactly what one clean run leaves (no event lost, none counted twice).

Needs Kafka and the Flink job server (both started on demand; ``reloop up kafka --with flink``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.flink_support import flink_args, flink_job_endpoint, isolated_job_config, job_outputs  # noqa: F401

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
MALFORMED = [
    b"{not json",
    b'{"event_id": "x1", "ts": "yesterday", "user_id": "1", "item_id": "2", "label": 1}',
    b'{"event_id": "x2", "user_id": "1"}',
    b"\xff\xfe",
]


def _replay(kafka, topic: str, start: int, stop: int, bad: list[bytes] = ()) -> None:
    from pipelines.kafka_io import producer
    from reloop.datasets import load_dataset
    from reloop.replay import replay_table

    table = load_dataset("movielens-100k", limit=stop).slice(start)
    half = table.num_rows // 2
    replay_table(table.slice(0, half), kafka, topic=topic)
    if bad:  # mid-stream, so they fall before the job's time-aligned cut of this micro-batch
        p = producer(kafka)
        for i, value in enumerate(bad):
            p.send(topic, key=f"bad{i}".encode(), value=value)
        p.flush()
        p.close()
    replay_table(table.slice(half), kafka, topic=topic)


def _run(cfg, args):
    from pipelines.feature_job import run_feature_job

    stats = run_feature_job(cfg, pipeline_args=args, repo_path=cfg.feast.repo_path)
    assert stats.committed
    return stats


def _assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if name.startswith("online_"):
            assert a[name] == b[name], name
        else:
            assert a[name].num_rows > 0, name
            assert a[name].equals(b[name]), f"{name} differs:\n{a[name].slice(0, 3)}\n{b[name].slice(0, 3)}"


COUNTS = (
    "records_read",
    "events_parsed",
    "dead_lettered",
    "accepted",
    "late",
    "duplicates",
    "deferred",
    "examples_written",
    "feature_rows_written",
    "dlq_reasons",
    "start",
    "stop",
    "run_id",
)


def test_fnapi_and_flink_give_identical_features_and_examples(kafka_config, unique_topic, tmp_path, flink_job_endpoint):  # noqa: F811
    local = isolated_job_config(tmp_path, kafka_config, unique_topic, "fnapi")
    flink = isolated_job_config(tmp_path, kafka_config, unique_topic, "flink")
    # two micro-batches: the second starts from the state the first saved, on each runner
    dead_lettered = 0
    for start, stop, bad in ((0, 2500, MALFORMED[:2]), (2500, 4000, MALFORMED[2:])):
        _replay(kafka_config, unique_topic, start, stop, bad)
        s_local = _run(local, None)
        s_flink = _run(flink, flink_args(flink_job_endpoint))
        assert {k: getattr(s_flink, k) for k in COUNTS} == {k: getattr(s_local, k) for k in COUNTS}
        dead_lettered += s_flink.dead_lettered
    assert dead_lettered > 0  # the dead-letter path ran on Flink too
    out_local, out_flink = job_outputs(local), job_outputs(flink)
    assert out_local["examples"].num_rows > 3000
    _assert_same_outputs(out_local, out_flink)


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


def _job_process(cfg, config_file: Path, endpoint: str, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RELOOP_FAULT", None)
    if fault:
        env["RELOOP_FAULT"] = fault
    cmd = [
        sys.executable,
        "-m",
        "pipelines.feature_job",
        "--once",
        "--config",
        str(config_file),
        "--feature_repo",
        cfg.feast.repo_path,
        *flink_args(endpoint),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _committed(cfg) -> dict[int, int | None]:
    from pipelines.consumer_group import partition_offsets

    committed, _, _ = partition_offsets(cfg.kafka, cfg.kafka.events_topic, cfg.kafka.consumer_group)
    return committed


def _jobs(endpoint: str) -> dict[str, str]:
    """Job id -> state name, as the job server reports them."""
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

    with grpc.insecure_channel(endpoint) as ch:
        infos = beam_job_api_pb2_grpc.JobServiceStub(ch).GetJobs(beam_job_api_pb2.GetJobsRequest()).job_info
    return {j.job_id: beam_job_api_pb2.JobState.Enum.Name(j.state) for j in infos}


def _new_running(endpoint: str, known: set[str]) -> list[str]:
    return [j for j, state in _jobs(endpoint).items() if j not in known and state == "RUNNING"]


def test_kill_and_rerun_on_flink_is_exactly_once(kafka_config, unique_topic, tmp_path, flink_job_endpoint):  # noqa: F811
    from pipelines.checkpoint import StateStore

    ref = isolated_job_config(tmp_path, kafka_config, unique_topic, "reference")
    crash = isolated_job_config(tmp_path, kafka_config, unique_topic, "flink")
    config_file = _write_config(crash, tmp_path / "flink.yaml")

    # 1) SIGKILL between the sinks and the commit: outputs written, offsets not committed
    _replay(kafka_config, unique_topic, 0, 2000, MALFORMED[:1])
    _run(ref, None)
    p = _job_process(crash, config_file, flink_job_endpoint, fault="before_commit")
    log = p.communicate(timeout=300)[0].decode(errors="replace")
    assert p.returncode == -signal.SIGKILL, log[-3000:]
    assert all(v is None for v in _committed(crash).values()), "offsets were committed before the crash"
    p = _job_process(crash, config_file, flink_job_endpoint)
    log = p.communicate(timeout=300)[0].decode(errors="replace")
    assert p.returncode == 0, log[-3000:]
    assert _committed(crash) == _committed(ref)

    # 2) SIGKILL while the Flink job runs (the LOOPBACK workers die with the process)
    _replay(kafka_config, unique_topic, 2000, 3500, MALFORMED[1:2])
    _run(ref, None)
    before = _committed(crash)
    p = _job_process(crash, config_file, flink_job_endpoint)
    known = set(_jobs(flink_job_endpoint))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and not _new_running(flink_job_endpoint, known):
        time.sleep(0.05)
    assert _new_running(flink_job_endpoint, known), "the job finished before the kill"  # kill mid-pipeline
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert _committed(crash) == before
    # The orphaned Flink job fails once its tasks cannot reach the dead SDK workers. (Beam 2.62's job service
    # may keep reporting it RUNNING: publishing FAILED to the vanished client's state stream throws.)
    pending = Path(crash.feature_job.state_uri) / "pending"
    p = _job_process(crash, config_file, flink_job_endpoint)
    log = p.communicate(timeout=300)[0].decode(errors="replace")
    assert p.returncode == 0, log[-3000:]
    assert _committed(crash) == _committed(ref)
    assert not list(pending.glob("*.json")), "a committed run left its pending plan behind"
    assert len(StateStore(crash.feature_job.state_uri).state_keys()) == 1

    out_ref, out_crash = job_outputs(ref), job_outputs(crash)
    assert out_ref["examples"].num_rows > 2500
    _assert_same_outputs(out_ref, out_crash)


def test_reloop_features_runner_flink_runs_on_the_local_job_server(
    kafka_config, unique_topic, tmp_path, flink_job_endpoint
):  # noqa: F811
    from typer.testing import CliRunner

    from reloop.cli import app

    cfg = isolated_job_config(tmp_path, kafka_config, unique_topic, "cli")
    _replay(kafka_config, unique_topic, 0, 500)
    before = set(_jobs(flink_job_endpoint))
    result = CliRunner().invoke(
        app,
        [
            "features",
            "--runner",
            "flink",
            "--config",
            str(_write_config(cfg, tmp_path / "cli.yaml")),
            "--feature_repo",
            cfg.feast.repo_path,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "read 500" in result.output
    new = {j: s for j, s in _jobs(flink_job_endpoint).items() if j not in before}
    assert list(new.values()) == ["DONE"], new
    committed = _committed(cfg)
    assert all(v is not None for v in committed.values()) and sum(committed.values()) > 0, committed
