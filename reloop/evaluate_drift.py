"""Score monitors on a synthetic stream with known drift: detection delay and false alarms.

The served model is the perfect model of the old concept (``p_stale`` of
:mod:`reloop.synthetic`): exactly what a model trained before the shift would
predict, so every loss increase after the shift is the drift's doing.

>>> from reloop.synthetic import generate
>>> s = generate("abrupt_ctr", n=6000, seed=1, at=3000)
>>> r = score_monitors(s, [{"kind": "page_hinkley", "metric": "logloss", "warmup": 500,
...                         "params": {"threshold": 100.0, "delta": 0.02, "mode": "up"}}])
>>> r["page_hinkley:logloss"]["false_alarms"], 0 < r["page_hinkley:logloss"]["delay"] < 2000
(0, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from online_models.drift.monitors import MonitorSuite
from online_models.drift.policy import DriftPolicy
from reloop.synthetic import SyntheticStream

FEATURES = ("item_pop", "price", "hour", "topic")


def score_monitors(
    stream: SyntheticStream,
    specs: Iterable[Mapping[str, Any]],
    default_warmup: int = 1000,
    policy: DriftPolicy | None = None,
    policy_monitors: Iterable[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """For each monitor: ``delay`` (events from the shift's first event to the first drift
    detection at or after it; None if missed), ``false_alarms`` (drift detections before
    the shift, or over the whole stream if it is stable) and ``warnings``.

    With a ``policy``, the rows ``policy:retrain`` and ``policy:alert`` score its requests the same way
    (a ``retrain`` or ``alert`` before the shift is a false alarm); ``policy_monitors`` names the
    monitors whose detections the policy sees (default: all)."""
    suite = MonitorSuite.from_specs(specs, default_warmup=default_warmup)
    t = stream.table
    labels = t.column("label").to_numpy()
    ts = t.column("ts").to_numpy()
    feats = {f: t.column(f).to_numpy().astype(float) for f in FEATURES if f in t.column_names}
    shift = stream.shift_start if stream.shift_start is not None else len(labels)
    out = {m.name: {"delay": None, "false_alarms": 0, "warnings": 0, "detections": 0} for m in suite.monitors}
    if policy_monitors is not None:
        policy_monitors = set(policy_monitors)
    if policy is not None:
        for action in ("retrain", "alert"):
            out[f"policy:{action}"] = {"delay": None, "false_alarms": 0, "warnings": 0, "detections": 0}
    p = stream.p_stale
    for i in range(len(labels)):
        dets = suite.update(p[i], int(labels[i]), {f: v[i] for f, v in feats.items()}, ts=int(ts[i]))
        if policy is not None:
            seen = dets if policy_monitors is None else [d for d in dets if d.detector in policy_monitors]
            for req in policy.step(i, seen):
                r = out[f"policy:{req.action}"]
                r["detections"] += 1
                if i < shift:
                    r["false_alarms"] += 1
                elif r["delay"] is None:
                    r["delay"] = i - shift
        for d in dets:
            r = out[d.detector]
            if d.level == "warning":
                r["warnings"] += 1
                continue
            r["detections"] += 1
            if i < shift:
                r["false_alarms"] += 1
            elif r["delay"] is None:
                r["delay"] = i - shift
    return out


def summarise(delays: list[int | None]) -> dict[str, Any]:
    """Median delay over seeds and how many seeds missed the shift."""
    hit = [d for d in delays if d is not None]
    return {
        "median_delay": float(np.median(hit)) if hit else None,
        "max_delay": max(hit) if hit else None,
        "missed": len(delays) - len(hit),
        "runs": len(delays),
    }
