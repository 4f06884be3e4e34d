"""The same scoring service as a Ray Serve deployment (``python -m jobs.serve --backend ray``), on its own
embedded Ray instance (stopped by a clean SIGINT of its driver, never ``ray stop``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from jobs.examples import write_example_files
from jobs.registry import ModelRegistry
from jobs.serve import prepare_feature_store
from jobs.trainer import IncrementalTrainer, TrainerConfig
from reloop.datasets import load_dataset, movielens_examples

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def test_ray_serve_backend_scores_validates_and_swaps(tmp_path):
    n = 2000
    prepare_feature_store(str(tmp_path / "features"), load_dataset("movielens-100k", limit=n))
    write_example_files(movielens_examples(n), str(tmp_path / "ex"), rows_per_file=n)
    t = IncrementalTrainer(
        TrainerConfig(
            str(tmp_path / "ex"), str(tmp_path / "ck"), registry_uri=str(tmp_path / "reg"), idle_exit=0, model_kind="lr"
        )
    )
    t.run()
    reg = ModelRegistry(str(tmp_path / "reg"))
    v1 = t.publish()
    reg.promote(v1)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.serve",
            "--backend",
            "ray",
            "--registry",
            str(tmp_path / "reg"),
            "--feast-repo",
            str(tmp_path / "features"),
            "--port",
            str(port),
            "--poll",
            "0.2",
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        r = requests.post(f"{url}/score", json={"user_id": "196", "item_id": "242"}, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == v1
        r = requests.post(f"{url}/score", json={"user_id": "196", "extra": 1}, timeout=10)
        assert r.status_code == 422 and "extra: unknown field" in r.json()["error"]
        v2 = t.publish()
        reg.promote(v2)
        deadline = time.monotonic() + 30
        while requests.post(f"{url}/score", json={"user_id": "1", "item_id": "2"}).json()["model_version"] != v2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)  # a clean exit shuts down the embedded Ray it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
