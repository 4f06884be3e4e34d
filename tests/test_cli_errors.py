"""Issue 18, CLI rows: every command turns a bad config or input into one line and exit code 2, and
``reloop run`` finds its Feast repo from any directory (or fails before replaying)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cli(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "reloop.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def bad_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "bad.yaml"
    p.write_text("kafka:\n  partitions: -3\n  nonsense_field: 1\n")
    return p


@pytest.mark.parametrize("command", [["features"], ["serve"], ["train"], ["retrain"], ["replay"], ["run"], ["monitor"]])
def test_a_bad_config_is_one_line_and_exit_code_2(command, bad_config, tmp_path):
    r = _cli([*command, "--config", str(bad_config)], cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml" in lines[0], r.stderr


def test_a_missing_config_file_is_one_line_and_exit_code_2(tmp_path):
    r = _cli(["train", "--config", str(tmp_path / "nope.yaml")], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope.yaml" in r.stderr


def test_run_finds_the_feast_repo_from_any_directory(tmp_path):
    from pipelines.config import FeastConfig
    from pipelines.feast_io import resolve_repo

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert resolve_repo(FeastConfig()) == (REPO / "features").resolve()
        with pytest.raises(FileNotFoundError, match="feature_store.yaml|feature_repo.py"):
            resolve_repo(FeastConfig(repo_path=str(tmp_path / "elsewhere")))
    finally:
        os.chdir(here)


def test_run_fails_before_replaying_when_the_feast_repo_is_missing(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"feast:\n  repo_path: {tmp_path / 'no-repo'}\n")
    r = _cli(["run", "--config", str(cfg), "--limit", "100", "--quiet"], cwd=tmp_path)
    assert r.returncode == 2 and "no Feast repo" in r.stderr and "Traceback" not in r.stderr
    assert "replay" not in r.stdout.lower()
