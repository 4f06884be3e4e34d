"""Shared helpers for the benchmark scripts: a printed table and a JSON result file; the scoring benchmarks'
set-up (a Feast store, a trained model) and server process."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from jobs.examples import write_example_files
from jobs.registry import ModelRegistry
from jobs.serve import prepare_feature_store
from jobs.trainer import IncrementalTrainer, TrainerConfig
from reloop import services
from reloop.datasets import load_dataset, movielens_examples
from reloop.side_tables import load_side_tables

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class services_up:
    """Context manager: start the local services a benchmark needs (``reloop.services``, on the ports of the
    environment) if they are down, and stop again only those it started. A benchmark needing Kafka then
    works from a cold machine instead of failing with a connection traceback."""

    def __init__(self, *names: str) -> None:
        self.names, self.started = names, []

    def __enter__(self) -> services_up:

        for name in self.names:
            svc = services.get(name)
            if not svc.status().running:
                print(f"starting {name} for the benchmark ...", flush=True)
                svc.start()
                self.started.append(svc)
        return self

    def __exit__(self, *exc) -> None:
        for svc in reversed(self.started):
            svc.stop()


def report(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Print ``rows`` as an aligned table and write them (plus machine info) to results/<name>.json."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    print(f"\nwrote {out}")
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


# -- the scoring benchmarks (bench_serve.py, bench_serve_guard.py, bench_slate.py) ------------------------------


def pct(xs: list[float]) -> dict[str, float]:
    """p50/p99 in milliseconds of durations in seconds."""
    a = np.asarray(xs) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "n": len(xs)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_world(root: Path, events: int, side_tables: bool = False, model_kind: str = "dcnv2"):
    """A private Feast store (SQLite) with the online features after the first ``events`` MovieLens-100K events
    (and, with ``side_tables``, the user profiles and item catalogue materialised online), plus a registry whose
    current version was trained on them. Returns ``(store, registry, pairs, labels)``."""

    table = load_dataset("movielens-100k", limit=events)
    side = {}
    if side_tables:
        side = dict(zip(("users", "items"), load_side_tables("movielens-100k")))
    store = prepare_feature_store(str(root / "features"), table, **side)
    write_example_files(movielens_examples(events), str(root / "examples"), rows_per_file=5000)
    t = IncrementalTrainer(
        TrainerConfig(
            str(root / "examples"),
            str(root / "ckpt"),
            registry_uri=str(root / "reg"),
            idle_exit=0,
            checkpoint_every=10**9,
            model_kind=model_kind,
            batch_size=512,
        )
    )
    t.run()
    t.publish()
    reg = ModelRegistry(str(root / "reg"))
    reg.promote(reg.versions()[-1])
    pairs = list(zip(table["user_id"].to_pylist(), table["item_id"].to_pylist()))
    labels = table["label"].to_pylist()
    return store, reg, pairs, labels


class ServerProc:
    """``python -m jobs.serve`` in its own process on a free port, ready once it serves a model."""

    def __init__(
        self, reg_uri: str, repo: str, backend: str = "http", use_memory: bool = True, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "jobs.serve",
            "--registry",
            reg_uri,
            "--feast-repo",
            repo,
            "--port",
            str(self.port),
            "--backend",
            backend,
            *extra_args,
        ]
        if not use_memory:
            cmd.append("--no-memory")
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-serve-{backend}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).json().get("model_version"):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready; see {self.log.name}")

    def stop(self) -> None:
        # SIGINT: a clean exit, so an embedded Ray cluster is shut down by its own driver
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fill(url: str, pairs, labels, n: int = 1000) -> None:
    """Fill a server's memory with the outcomes of the first ``n`` pairs (scored, then answered)."""

    s = requests.Session()
    for (u, i), y in zip(pairs[:n], labels[:n]):
        rid = s.post(f"{url}/score", json={"user_id": u, "item_id": i}).json()["request_id"]
        s.post(f"{url}/feedback", json={"request_id": rid, "label": y})
