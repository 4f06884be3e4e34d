"""The whole loop on the cluster profile against the embedded profile, on the same stream.

    python benchmarks/bench_cluster_profile.py [--events 20000]

Runs ``reloop run`` twice on the same events (embedded, then ``--profile cluster``: Flink job server,
Redis, a Ray head + 1 worker node, s3proxy) and reports each run's wall time, per-stage events/s (the
run's own throughput figures: replay, feature job, trainer over wall time, scoring + memory) and the peak
resident memory of every service while it ran: each service's whole process group (a JVM, or a Ray node
with its raylet and workers), sampled every 0.5 s, plus the ``reloop run`` process tree itself.
The cluster / embedded ratio of each figure is the number to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import report  # noqa: E402
from reloop import services  # noqa: E402

SERVICES = ("kafka", "redis", "s3", "flink", "ray", "ray-worker-1")


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _groups() -> dict[int, list[int]]:
    """process group id -> its pids; and parent links for the run's tree."""
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    pgid = int(f.read().rsplit(") ", 1)[1].split()[2])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(pgid, []).append(int(d))
    return out


def _tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


class PeakRss(threading.Thread):
    """Peak summed RSS (MB) of each service's process group and of the run's process tree."""

    def __init__(self, run_pid: int) -> None:
        super().__init__(daemon=True)
        self.run_pid, self.peak = run_pid, {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            groups = _groups()
            sample = {"reloop run (driver tree)": sum(_rss_kb(p) for p in _tree(self.run_pid))}
            for name in SERVICES:
                pid = services.get(name).pid()
                if pid is not None:
                    sample[name] = sum(_rss_kb(p) for p in groups.get(pid, [pid]))
            for k, v in sample.items():
                self.peak[k] = max(self.peak.get(k, 0), v / 1024)
            self.done.wait(0.5)


def run(tmp: Path, name: str, events: int, *extra: str) -> tuple[dict, dict]:
    run_id = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    cmd = [
        sys.executable,
        "-m",
        "reloop.cli",
        "run",
        "--limit",
        str(events),
        "--quiet",
        "--feature-every",
        "2",
        "--inject-drift",
        "abrupt_ctr",
        "--drift-at",
        "0.5",
        "--retrain-min-rows",
        "2000",
        "--run-id",
        run_id,
        "--reports",
        str(tmp / "reports"),
        "--state-dir",
        str(tmp / "runs"),
        *extra,
    ]
    t0 = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rss = PeakRss(proc.pid)
    rss.start()
    out, _ = proc.communicate()
    rss.done.set()
    rss.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{out[-4000:]}")
    summary = json.loads((tmp / "reports" / run_id / "summary.json").read_text())
    summary["process_seconds"] = time.time() - t0
    return summary, rss.peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="reloop-bench-cluster-"))
    rows, peaks, counts = [], {}, {}
    for name, extra in (("embedded", ()), ("cluster", ("--profile", "cluster"))):
        s, peak = run(tmp, name, a.events, *extra)
        row = {"profile": name, "wall_s": s["seconds"], "process_s": s["process_seconds"]}
        row.update({f"{k} ev/s": v for k, v in s["throughput_events_per_s"].items()})
        rows.append(row)
        peaks[name] = peak
        counts[name] = s["counts"]
    ratio = {"profile": "cluster / embedded"}
    for k in rows[0]:
        if k != "profile" and rows[0][k]:
            ratio[k] = rows[1][k] / rows[0][k]
    rows.append(ratio)
    for name, peak in peaks.items():
        print(f"peak RSS MB ({name}): " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(peak.items())))
    report("cluster_profile", rows, {"peak_rss_mb": peaks, "counts": counts, "events": a.events})
    return 0


if __name__ == "__main__":
    sys.exit(main())
