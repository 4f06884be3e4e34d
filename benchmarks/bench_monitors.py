"""Benchmark: the drift monitors fed per record (``MonitorSuite.update``, one call and one signals dict per event,
what ``jobs.monitor.MonitorLoop.process`` does today) vs per batch (``MonitorSuite.update_batch``, signals on
arrays), same default monitor set, same synthetic stream, same run. Both end in the same state (tested in
tests/test_drift_monitors_batch.py); the ratio is the figure.

    python benchmarks/bench_monitors.py [--events 100000] [--batch 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from online_models.drift.defaults import DEFAULT_MONITORS  # noqa: E402
from online_models.drift.monitors import MonitorSuite  # noqa: E402
from reloop.synthetic import generate  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args(argv)
    s = generate("stable", n=args.events, seed=1)
    p, y, ts = np.asarray(s.p_stale), s.table["label"].to_numpy(), s.table["ts"].to_numpy()
    one, many = MonitorSuite.from_specs(DEFAULT_MONITORS), MonitorSuite.from_specs(DEFAULT_MONITORS)
    t0 = time.perf_counter()
    for pi, yi, ti in zip(p.tolist(), y.tolist(), ts.tolist()):
        one.update(pi, yi, None, ts=ti, model_version="v1")
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lo in range(0, len(p), args.batch):
        many.update_batch(
            p[lo : lo + args.batch], y[lo : lo + args.batch], None, ts=ts[lo : lo + args.batch], model_version="v1"
        )
    t_many = time.perf_counter() - t0
    n = len(p)
    rows = [
        {"path": "per record (update)", "events_per_s": n / t_one, "x per record": 1.0},
        {
            "path": f"per batch of {args.batch} (update_batch)",
            "events_per_s": n / t_many,
            "x per record": t_one / t_many,
        },
    ]
    report("bench_monitors", rows, {"events": n, "monitors": [m.name for m in one.monitors]})
    return rows


if __name__ == "__main__":
    main()
