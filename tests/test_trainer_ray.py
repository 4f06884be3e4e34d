"""The trainer as a real Ray job: `ray job submit` to the local head, SIGKILL mid-stream, resubmit, resume.

Needs the Ray head of ``reloop up ray`` (started here if it is not running; never stopped here,
other tests and users share it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from jobs.examples import write_example_files
from jobs.trainer import RAY_EXCLUDES, event_digest, read_checkpoint_state
from reloop.datasets import movielens_examples

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_head():
    from reloop import services

    st = services.get("ray").start()  # idempotent
    env = {**os.environ, **services.ray_client_env()}
    return st.address, env


def _submit(address: str, env: dict, job_id: str, args: list[str]) -> None:
    ray_cli = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray_cli,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--no-wait",
        "--submission-id",
        job_id,
        "--runtime-env-json",
        json.dumps({"excludes": RAY_EXCLUDES}),
        "--",
        sys.executable,
        "-m",
        "jobs.trainer",
        *args,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def _status(address: str, env: dict, job_id: str) -> str:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "status", "--address", address, job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr).lower()
    for word, s in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("stopped", "STOPPED")):
        if f"job '{job_id}' {word}" in text:
            return s
    return "RUNNING" if "running" in text else "PENDING" if "pending" in text else "UNKNOWN"


def _logs(address: str, env: dict, job_id: str) -> str:
    return subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "logs", "--address", address, job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def _wait_terminal(address, env, job_id, timeout=240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _status(address, env, job_id)
        if s in ("SUCCEEDED", "FAILED", "STOPPED"):
            return s
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} not finished after {timeout}s:\n{_logs(address, env, job_id)[-3000:]}")


def test_submitted_trainer_killed_mid_stream_resumes_and_learns_each_example_once(ray_head, tmp_path):
    address, env = ray_head
    examples = movielens_examples(4000)
    ex, ck = tmp_path / "examples", tmp_path / "trainer"
    write_example_files(examples.slice(0, 3000), str(ex), rows_per_file=400)
    args = [
        "--examples",
        str(ex),
        "--checkpoint-dir",
        str(ck),
        "--batch-size",
        "50",
        "--checkpoint-every",
        "400",
        "--model",
        "deepfm",
        "--throttle",
        "0.05",
    ]

    job1 = f"trainer-test-{uuid.uuid4().hex[:8]}"
    _submit(address, env, job1, args)
    # wait until a checkpoint exists and the actor has learned past it (unsaved progress to lose)
    deadline = time.monotonic() + 180
    hb = None
    while time.monotonic() < deadline:
        state = read_checkpoint_state(str(ck))
        try:
            hb = json.loads((ck / "heartbeat.json").read_text())
        except (OSError, ValueError):
            hb = None
        if state and state["learned"] >= 800 and hb and hb["learned"] > state["learned"] + 100:
            break
        assert _status(address, env, job1) in ("RUNNING", "PENDING"), _logs(address, env, job1)[-3000:]
        time.sleep(0.2)
    else:
        raise AssertionError(f"no checkpoint in time:\n{_logs(address, env, job1)[-3000:]}")
    os.kill(hb["pid"], signal.SIGKILL)  # crash the trainer actor mid-stream: no chance to checkpoint
    assert _wait_terminal(address, env, job1) == "FAILED"
    at_crash = read_checkpoint_state(str(ck))
    assert 0 < at_crash["learned"] < 3000

    # more examples arrive while it is down, then it is resubmitted with the same checkpoint dir
    write_example_files(examples.slice(3000), str(ex), rows_per_file=400, start=100)
    job2 = f"trainer-test-{uuid.uuid4().hex[:8]}"
    _submit(address, env, job2, [*args, "--idle-exit", "2", "--throttle", "0"])
    assert _wait_terminal(address, env, job2) == "SUCCEEDED", _logs(address, env, job2)[-3000:]
    logs = _logs(address, env, job2)
    assert "resumed from ckpt-" in logs

    final = read_checkpoint_state(str(ck))
    assert final["runs"][-1]["resumed_learned"] == at_crash["learned"]
    assert final["learned"] == examples.num_rows  # none skipped...
    assert int(final["digest"], 16) == event_digest(examples["event_id"].to_pylist())  # ...and none twice
