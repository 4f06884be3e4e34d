"""Drift detection on seeded synthetic streams: delay (events after the shift) and false alarms.

    python benchmarks/bench_drift.py [--seeds 3] [--n 30000] [--stable-n 100000]

The served model is the perfect model of the pre-shift concept (``p_stale`` of
``reloop.synthetic``), so every change in its loss is the drift's doing.
Scenarios: abrupt and gradual CTR-level shift, abrupt user-interest shift,
abrupt item-popularity shift (covariate only: the model is still right, only
the prediction and feature distributions move), and a stable stream for
false alarms. Rows are monitors (``kind:metric``), plus the default policy's
``retrain`` and ``alert`` requests (fed by the default monitor set only). Delay = median over seeds of the events
from the first shifted event to the first drift detection at or after it
(``miss`` if never, with the number of seeds missed); FA = drift detections
before the shift, summed over seeds. The stable column counts detections
over the whole stream. The reference in the same run is the ideal detector
(delay 0, no false alarm); the gradual scenario's shift is a ramp over
``width`` events, so a delay within the ramp is expected.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json

from benchmarks.common import report  # noqa: E402
from jobs.alerts import HookDispatcher
from jobs.monitor import MonitorLoop, parse_prediction
from online_models.drift.defaults import DEFAULT_MONITORS, PREDICTION  # noqa: E402
from online_models.drift.monitors import (
    MonitorSuite,
    make_monitor,  # noqa: E402
)
from online_models.drift.policy import DriftPolicy  # noqa: E402
from reloop.evaluate_drift import score_monitors, summarise  # noqa: E402
from reloop.synthetic import generate  # noqa: E402

#: every detector the package supports, with the parameters used by the default config where it has them
BENCH_MONITORS = [
    {"kind": "adwin", "metric": "logloss", "params": {"delta": 0.0001}},
    {"kind": "page_hinkley", "metric": "logloss", "params": {"threshold": 100.0, "delta": 0.02, "mode": "up"}},
    {"kind": "ddm", "metric": "error", "params": {}},
    {"kind": "eddm", "metric": "error", "params": {}},
    {"kind": "hddm_a", "metric": "error", "params": {}},
    {"kind": "hddm_w", "metric": "error", "params": {}},
    {"kind": "adwin", "metric": "click", "params": {"delta": 0.0001}},
    {"kind": "page_hinkley", "metric": "click", "params": {"threshold": 100.0, "delta": 0.005}},
    {"kind": "psi", "metric": PREDICTION, "params": {}},
    {"kind": "ks", "metric": PREDICTION, "params": {"mode": "decay", "bins": 50}},
    {"kind": "psi", "metric": "item_pop", "params": {}},
    {"kind": "ks", "metric": "item_pop", "params": {}},
    {"kind": "psi", "metric": "item_pop", "params": {"mode": "decay"}},
]
#: the policy sees only the default monitor set (what `reloop monitor` runs), not every bench row
POLICY_MONITORS = [make_monitor(m["kind"], m["metric"], m["params"]).name for m in DEFAULT_MONITORS]
SCENARIOS = ("abrupt_ctr", "gradual_ctr", "abrupt_interest", "abrupt_popularity")


def throughput(n: int) -> dict:
    """Events/s of the monitor loop (JSON parse + default monitors + policy) against the reference measured
    in the same run: ``json.loads`` of the same records, the floor of any consumer of the JSON topic."""

    s = generate("stable", n=n, seed=99)
    rows = s.table.to_pylist()
    raw = [
        json.dumps(
            {
                "event_id": r["event_id"],
                "ts": r["ts"],
                "user_id": r["user_id"],
                "item_id": r["item_id"],
                "p": float(p),
                "label": r["label"],
                "model_version": "v1",
                "item_pop": r["item_pop"],
            }
        ).encode()
        for r, p in zip(rows, s.p_stale)
    ]
    t0 = time.perf_counter()
    for b in raw:
        json.loads(b)
    ref = time.perf_counter() - t0
    loop = MonitorLoop(MonitorSuite.from_specs(DEFAULT_MONITORS), DriftPolicy(), HookDispatcher([]))
    t0 = time.perf_counter()
    for b in raw:
        loop.process(parse_prediction(b))
    ours = time.perf_counter() - t0
    return {"events": n, "loop_events_per_s": n / ours, "json_loads_events_per_s": n / ref, "ratio": ref / ours}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=30_000, help="events per drift stream (shift in the middle)")
    ap.add_argument("--stable-n", type=int, default=100_000)
    ap.add_argument("--stable-seeds", type=int, default=3)
    ap.add_argument("--width", type=int, default=5_000, help="gradual: ramp width in events")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    raw: dict[str, list] = {}
    for sc in SCENARIOS:
        runs = [
            score_monitors(
                generate(sc, n=args.n, seed=s, width=args.width),
                BENCH_MONITORS,
                policy=DriftPolicy(),
                policy_monitors=POLICY_MONITORS,
            )
            for s in range(1, args.seeds + 1)
        ]
        raw[sc] = runs
        results[sc] = {
            name: {
                **summarise([r[name]["delay"] for r in runs]),
                "false_alarms": sum(r[name]["false_alarms"] for r in runs),
            }
            for name in runs[0]
        }
        print(f"{sc}: done ({time.perf_counter() - t0:.0f}s)", flush=True)
    stable = [
        score_monitors(
            generate("stable", n=args.stable_n, seed=s),
            BENCH_MONITORS,
            policy=DriftPolicy(),
            policy_monitors=POLICY_MONITORS,
        )
        for s in range(1, args.stable_seeds + 1)
    ]
    raw["stable"] = stable
    print(f"stable: done ({time.perf_counter() - t0:.0f}s)", flush=True)

    stable_col = f"stable {args.stable_seeds}x{args.stable_n // 1000}k FA"
    rows = []
    for name in stable[0]:
        row: dict = {"monitor": name}
        for sc in SCENARIOS:
            r = results[sc][name]
            d = "miss" if r["median_delay"] is None else f"{r['median_delay']:.0f}"
            if r["missed"] and r["median_delay"] is not None:
                d += f" ({r['missed']}/{r['runs']} miss)"
            row[f"{sc} delay"] = d
            row[f"{sc} FA"] = r["false_alarms"]
        row[stable_col] = sum(s[name]["detections"] for s in stable)
        rows.append(row)
    rows.append(
        {
            "monitor": "reference: ideal detector",
            **{f"{sc} delay": "0" for sc in SCENARIOS},
            **{f"{sc} FA": 0 for sc in SCENARIOS},
            stable_col: 0,
        }
    )
    tp = throughput(50_000)
    print(
        f"monitor loop: {tp['loop_events_per_s']:,.0f} events/s (JSON parse + {len(DEFAULT_MONITORS)} default "
        f"monitors + policy); json.loads alone: {tp['json_loads_events_per_s']:,.0f}/s; ratio {tp['ratio']:.3f}"
    )
    report(
        "bench_drift",
        rows,
        {
            "args": vars(args),
            "monitors": BENCH_MONITORS,
            "summary": results,
            "stable": stable,
            "throughput": tp,
            "seconds": time.perf_counter() - t0,
        },
    )


if __name__ == "__main__":
    main()
