"""Seconds from an injected shift to the retrained model serving, stage by stage, on the real services.

    python benchmarks/bench_drift_loop.py [--limit 40000] [--scenario abrupt_interest]

Runs ``reloop run`` on MovieLens-100K with an injected shift (incremental refreshes off, so the served
model only changes through the drift loop) and reads the stamps of the run: when the first shifted event
was served, the first alert and retrain request after it, the retrain submission (after enough post-drift
data), the gate's decision and the new version serving. The reference measured in the same run is the
retrain's own ``TorchTrainer.fit`` time: the ratio says how much of the reaction is the fit itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report  # noqa: E402
from reloop.config import ReloopConfig
from reloop.run import LoopRun, RunOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=40_000)
    ap.add_argument("--scenario", default="abrupt_interest")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    opts = RunOptions(
        limit=args.limit,
        inject_drift=args.scenario,
        drift_at=0.5,
        refresh=False,
        progress=False,
        run_id=f"bench-drift-{tmp.name[-8:]}",
        report_root=str(tmp / "reports"),
        state_root=str(tmp / "runs"),
    )
    s = LoopRun(ReloopConfig(), opts).run()
    if s["errors"]:
        raise SystemExit(f"the run failed: {s['errors']}")
    shift_ts, t_shift = s["shift"]["start_ts"], s["shift_first_served_wall_s"]
    e_shift = s["shift_first_served_at_event"]
    rows = [
        {
            "stage": "first shifted event served",
            "events after shift": 0,
            "event time": "shift",
            "wall s after shift": 0.0,
        }
    ]

    def add(stage: str, rec: dict | None) -> dict | None:
        if rec is not None:
            rows.append(
                {
                    "stage": stage,
                    "events after shift": rec["at_event"] - e_shift,
                    "event time": f"+{(rec['ts'] - shift_ts) / 3.6e6:.1f} h",
                    "wall s after shift": round(rec["wall_s"] - t_shift, 2),
                }
            )
        return rec

    first = lambda xs: next(iter(xs), None)  # noqa: E731
    add("first alert", first(a for a in s["alerts"] if a["ts"] >= shift_ts))
    add("retrain requested (policy)", first(a for a in s["alerts"] if a["ts"] >= shift_ts and a["action"] == "retrain"))
    dep = [e for e in s["deployer"] if e["ts"] >= shift_ts]
    add("retrain submitted (post-drift data in)", first(e for e in dep if e["what"] == "retrain submitted"))
    decided = add("candidate gated", first(e for e in dep if e["what"].startswith("retrain candidate")))
    served = add(
        "new version serving",
        first(v for v in s["versions"] if v["ts"] >= shift_ts and v["reason"].startswith("retrain")),
    )
    fit = decided.get("fit_seconds") if decided else None
    extra = {
        "shift": s["shift"],
        "fit_seconds": fit,
        "shift_to_serving_s": None if served is None else round(served["wall_s"] - t_shift, 2),
        "ratio_total_to_fit": None if served is None or not fit else round((served["wall_s"] - t_shift) / fit, 2),
        "variants": s["variants"],
    }
    rows.append(
        {
            "stage": "reference: TorchTrainer.fit of the retrain",
            "events after shift": "",
            "event time": "",
            "wall s after shift": fit if fit is not None else "n/a",
        }
    )
    report("drift_loop", rows, extra)
    print(
        f"shift -> serving: {extra['shift_to_serving_s']} s; of which fit {fit} s (ratio {extra['ratio_total_to_fit']})"
    )


if __name__ == "__main__":
    main()
