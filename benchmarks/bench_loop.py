"""Benchmark: the whole loop (``reloop run``) on synthetic streams of growing length: the scaling curve.

For each N (default 100k, 300k, 1M) it runs ``reloop run --dataset synthetic:stable?n=N --quiet`` on the
embedded profile (the ports and state dir of the environment) as a child process and records:

- wall time and events/s end to end (N / wall);
- per-stage events/s from the run's ``summary.json`` (replay, feature job, trainer, scoring + memory);
- peak RSS of each process of the run, sampled every ``--sample`` seconds over the process tree of the
  child plus the broker it starts: driver (the ``reloop run`` process), broker (the Kafka JVM), Ray
  workers and other children, each summed per class at each sample, then the peak over the run;
- disk used under the run's state directory and its reports;
- the reference measured in the same run: the loop's events/s over the feature job's own events/s (the
  feature job's throughput in the same summary), and peak RSS at each N over that at the smallest N.

Targets (issue 15): >= 10,000 events/s sustained at 1M, peak RSS at 1M <= 1.5x that at 100k.

    python benchmarks/bench_loop.py [--sizes 100000 300000 1000000] [--timeout 3600]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from reloop import services


def _classify(proc: psutil.Process, driver_pid: int) -> str:
    try:
        if proc.pid == driver_pid:
            return "driver"
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if "kafka.Kafka" in cmd:
        return "broker"
    if "ray" in cmd:
        return "ray"
    return "other"


def _broker() -> psutil.Process | None:
    """The local Kafka broker of this environment (its pid file), whether the run or someone else started it."""

    pid = services.get("kafka").pid()
    try:
        return psutil.Process(pid) if pid else None
    except psutil.NoSuchProcess:
        return None


def _sample(driver: psutil.Process) -> dict[str, int]:
    """RSS bytes per process class now, over the driver, all its descendants and the broker (started in its own
    session, so not always a descendant)."""
    out: dict[str, int] = {}
    try:
        procs = [driver, *driver.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    broker = _broker()
    if broker is not None and broker.pid not in {p.pid for p in procs}:
        procs.append(broker)
    for p in procs:
        try:
            rss = p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        kind = _classify(p, driver.pid)
        out[kind] = out.get(kind, 0) + rss
    return out


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def run_one(n: int, work: Path, timeout: float, sample_s: float, model: str) -> dict:
    run_id = f"bench-loop-{n}-{int(time.time())}"
    reports, state = work / "reports", work / "runs"
    cmd = [
        sys.executable,
        "-m",
        "reloop.cli",
        "run",
        "--dataset",
        f"synthetic:stable?n={n}",
        "--model",
        model,
        "--quiet",
        "--run-id",
        run_id,
        "--reports",
        str(reports),
        "--state-dir",
        str(state),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(work / f"{run_id}.log", "w")
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    driver = psutil.Process(child.pid)
    peak: dict[str, int] = {}
    peak_total = 0
    while child.poll() is None:
        if time.perf_counter() - t0 > timeout:
            child.terminate()
            child.wait(30)
            break
        s = _sample(driver)
        for k, v in s.items():
            peak[k] = max(peak.get(k, 0), v)
        peak_total = max(peak_total, sum(v for k, v in s.items() if k != "gone"))
        time.sleep(sample_s)
    wall = time.perf_counter() - t0
    log.close()
    row = {"events": n, "exit": child.returncode, "wall_s": wall, "events_per_s": n / wall}
    summary_path = reports / run_id / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        tp = summary.get("throughput_events_per_s", {})
        for stage, rate in tp.items():
            row[f"{stage} ev/s"] = rate
        row["run_seconds"] = summary.get("seconds")
        fj = tp.get("feature job") or 0.0
        row["loop / feature job"] = (n / wall) / fj if fj else None
        row["scored"] = summary.get("counts", {}).get("scored")
    else:
        row["error"] = f"no summary.json (see {work / (run_id + '.log')})"
    for k in ("driver", "broker", "ray", "other"):
        row[f"peak rss {k} MB"] = peak.get(k, 0) / 2**20
    row["peak rss total MB"] = peak_total / 2**20
    row["disk state MB"] = _du(state / run_id) / 2**20 if (state / run_id).exists() else _du(state) / 2**20
    row["disk reports MB"] = _du(reports / run_id) / 2**20
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--model", default="dcnv2")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run before it is stopped")
    ap.add_argument("--sample", type=float, default=0.5, help="seconds between RSS samples")
    ap.add_argument("--keep", action="store_true", help="keep the runs' state and reports")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    rows = []
    try:
        for n in args.sizes:
            print(f"reloop run on synthetic:stable?n={n} ...", flush=True)
            rows.append(run_one(n, work, args.timeout, args.sample, args.model))
            print(json.dumps(rows[-1], default=str), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[0].get("peak rss total MB") if rows else None
    for r in rows:
        r["peak rss / smallest N"] = r["peak rss total MB"] / base if base else None
    report(
        "bench_loop",
        rows,
        {
            "targets": {"events_per_s_at_1M": 10_000, "peak_rss_1M_over_100k": 1.5},
            "work_dir": str(work) if args.keep else None,
        },
    )
    return rows


if __name__ == "__main__":
    main()
