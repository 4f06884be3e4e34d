"""The retrain job on real Ray Train (embedded ``ray.init``): a candidate version with holdout metrics."""

from __future__ import annotations

import pytest
import torch

from jobs.examples import write_example_files
from jobs.registry import ModelRegistry
from jobs.retrain import RetrainConfig, RetrainWorker, resolve_window, run_retrain, run_retrains, split_window
from reloop.datasets import movielens_examples

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_split_is_by_time():
    import pyarrow as pa

    t = pa.table({"ts": list(range(10))})
    train, hold = split_window(t, 0.2)
    assert train["ts"].to_pylist() == list(range(8)) and hold["ts"].to_pylist() == [8, 9]


def test_retrain_publishes_a_candidate_with_holdout_metrics(tmp_path):
    import ray

    examples = movielens_examples(6000)
    write_example_files(examples, str(tmp_path / "ex"), rows_per_file=2000)
    reg = ModelRegistry(str(tmp_path / "reg"))
    cfg = RetrainConfig(
        examples_uri=str(tmp_path / "ex"),
        registry_uri=str(tmp_path / "reg"),
        storage_path=str(tmp_path / "train"),
        model_kind="lr",
        window_days=None,
        epochs=1,
        num_workers=1,
    )
    ts_min, ts_max = resolve_window(cfg)
    assert (ts_min, ts_max) == (None, None)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        first = run_retrain(RetrainConfig(**{**cfg.__dict__, "promote": True}))
        second = run_retrain(cfg)
        ts = [int(t) for t in examples["ts"].to_numpy()]
        window = RetrainConfig(**{**cfg.__dict__, "ts_min": ts[4000], "ts_max": ts[-1] + 1, "replay_ratio": 0.5})
        # a warm and a cold candidate from one fit (one worker group), and the same cold fit on its own
        warm, cold = run_retrains(window, [first["version"], None])
        alone = run_retrain(window)
        # the long-lived worker fits the same models as Ray Train's worker group, without its start-up
        worker = ray.remote(num_cpus=1)(RetrainWorker).remote()
        on_worker = run_retrains(window, [first["version"], None], worker=worker)
    finally:
        ray.shutdown()
    assert reg.current() == first["version"]  # promoted on request
    assert second["version"] != reg.current()  # a candidate is not promoted by default
    entry = reg.entry(second["version"])
    assert 0.5 < entry.metrics["holdout_auc"] <= 1.0 and entry.metrics["holdout_n"] == 600
    assert entry.training_range["train_rows"] == 5400 and entry.feature_service == "ctr_lr_v1"
    # the reference for the promotion gate: the current model scored on the same holdout
    assert entry.extra["holdout_current"]["version"] == first["version"]
    assert "auc" in entry.extra["holdout_current"]
    reg.verify(second["version"])
    assert entry.training_range["trained_until_ts"] == max(examples["ts"].to_pylist())
    # a warm start keeps the served model's encoder and adds a replay sample of older examples
    w = reg.entry(warm["version"])
    assert w.extra["start"] == f"warm from {first['version']}"
    assert w.extra["encoder"] == reg.entry(first["version"]).extra["encoder"]
    assert w.training_range["train_rows"] > 0.9 * 2000 * 1.4 and w.training_range["train_ts"][0] < ts[4000]
    # the cold candidate of the joint fit is the same model as the cold fit alone (the warm one before it
    # changes nothing), without the replay sample, and both candidates share the fit's time
    c = reg.entry(cold["version"])
    assert c.extra["start"] == "cold" and c.extra["replay_ratio"] == 0.0 and c.extra["fitted_with"] == 2
    assert w.extra["fit_seconds"] == c.extra["fit_seconds"]
    assert c.training_range["train_rows"] == reg.entry(alone["version"]).training_range["train_rows"] == 1800
    a, b = reg.load(cold["version"])[1], reg.load(alone["version"])[1]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for joint, kept in zip((warm, cold), on_worker):
        a, b = reg.load(joint["version"])[1], reg.load(kept["version"])[1]
        assert all(torch.equal(a[k], b[k]) for k in a) and kept["checkpoint"] is None
        assert reg.entry(kept["version"]).training_range == reg.entry(joint["version"]).training_range
