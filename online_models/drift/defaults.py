"""Default monitor set, kept free of heavy imports so the config can use it cheaply."""

from __future__ import annotations

from typing import Any

#: the signal used by distribution tests on the model output
PREDICTION = "prediction"

#: the default set, tuned on the synthetic streams (benchmarks/bench_drift.py): at most ~2 false
#: alarms per 100k stable events each, and the policy's min_evidence=2 filters those out. Page-Hinkley
#: on the click rate is left out: it fires on the same click bursts as Page-Hinkley on the loss, so
#: the two would count as independent evidence when they are not (see the benchmark).
DEFAULT_MONITORS: tuple[dict[str, Any], ...] = (
    {"kind": "adwin", "metric": "logloss", "params": {"delta": 0.0001}},
    {"kind": "page_hinkley", "metric": "logloss", "params": {"threshold": 100.0, "delta": 0.02, "mode": "up"}},
    {"kind": "hddm_a", "metric": "error", "params": {}},
    {"kind": "adwin", "metric": "click", "params": {"delta": 0.0001}},
    {"kind": "psi", "metric": PREDICTION, "params": {}},
    {"kind": "ks", "metric": PREDICTION, "params": {"mode": "decay", "bins": 50}},
)
