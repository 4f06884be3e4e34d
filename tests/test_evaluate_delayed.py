"""The delay comparison runs end to end on a small stream and accounts for fake negatives honestly."""

from __future__ import annotations

import numpy as np

from reloop.evaluate_delayed import VARIANTS, DelayedEvalConfig, joined_examples, run, table


def test_joined_streams_line_up_and_every_window_closes():
    cfg = DelayedEvalConfig(limit=3000)
    delayed, nodelay, y_true = joined_examples(cfg)
    assert delayed.num_rows == nodelay.num_rows == 3000 == len(y_true)
    lab = delayed["label"].to_numpy()
    assert (nodelay["label"].to_numpy() == lab).all()
    pos = lab == 1  # immediate clicks (the no-delay variant learns every example at its impression time)
    assert (nodelay["label_ts"].to_numpy()[pos] == nodelay["ts"].to_numpy()[pos]).all()
    lag = delayed["label_ts"].to_numpy() - delayed["ts"].to_numpy()
    assert (lag[lab == 0] == cfg.window_ms).all() and (lag[lab == 1] <= cfg.window_ms).all()
    assert ((y_true == 1) & (lab == 0)).sum() > 0 and ((y_true == 0) & (lab == 1)).sum() == 0


def test_the_comparison_runs_and_reports_every_variant():
    r = run(DelayedEvalConfig(limit=3000, chunk=300))
    assert set(r["variants"]) == set(VARIANTS)
    v = r["variants"]
    late_share = r["stream"]["clicks_after_window"] / r["stream"]["impressions"]
    # waiting: the only fake negatives are clicks after the window (labels still pending at the end are not learnt)
    assert abs(v["wait"]["fake_negative_share"] - late_share) < 0.01
    assert v["fnw"]["fake_negative_share"] > v["wait"]["fake_negative_share"]  # every positive was a negative first
    assert v["wait"]["samples_learnt"] < v["fnw"]["samples_learnt"] <= 3000 + r["stream"]["attributed_positives"]
    assert all(np.isfinite(x["auc"]) and np.isfinite(x["logloss"]) for x in v.values())
    assert r["cbpe"]["chunks"] and np.isfinite(r["cbpe"]["mae_auc"])
    assert "| fnw |" in table(r)
