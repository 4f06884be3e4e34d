"""The chronological evaluation on a small prefix of MovieLens-100K: keys, determinism, protocol."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from reloop.evaluate import VARIANTS, EvaluationConfig, EvaluationError, run_evaluation, write_results

SMALL = dict(
    limit=6000,
    slots=3,
    batch_size=200,
    tables_grid=(8,),
    bits_grid=(8,),
    lam_grid=(0.2,),
    gamma_grid=(1.0,),
    decay_grid=(1.0,),
    tau_grid=(0.2,),
    shrinkage_grid=(0.0, 5.0),
    memory_buffer=2000,
)


@pytest.fixture(scope="module")
def small_result():
    return run_evaluation(EvaluationConfig(**SMALL))


def test_every_variant_has_overall_and_per_slot_metrics(small_result, tmp_path) -> None:
    json_path, png_path = write_results(small_result, tmp_path / "r.json")
    doc = json.loads(json_path.read_text())
    for v in VARIANTS:
        assert set(doc[v]) >= {"auc", "gauc", "logloss", "slots"}
        assert len(doc[v]["slots"]) == 3
        assert 0.5 < doc[v]["auc"] < 1.0 and 0.3 < doc[v]["logloss"] < 1.0
        assert sum(s["n"] for s in doc[v]["slots"]) == 3000  # the second half, every event scored once
    assert png_path.stat().st_size > 1000
    # memory hyper-parameters come from the validation slot, which ends where the test slots begin
    lo, hi = doc["memory_validation"]["slot"]
    assert hi == doc["split"]["warmup_end"] == doc["split"]["slots"][0][0] and lo < hi
    assert len(doc["memory_validation"]["trials"]) == 1 + 2


def test_same_seed_same_numbers(small_result) -> None:
    again = run_evaluation(EvaluationConfig(**SMALL))
    assert again["variants"] == small_result["variants"]


def test_frozen_base_is_not_the_incremental_model(small_result) -> None:
    v = small_result["variants"]
    assert v["base"]["slots"] != v["incremental"]["slots"]
    # with lambda chosen > 0 the memory changes predictions; with 0 it equals the model exactly
    if small_result["memory_config"]["lam"] == 0:
        assert v["base+memory"]["slots"] == v["base"]["slots"]
    else:
        assert v["base+memory"]["slots"] != v["base"]["slots"]


def test_bad_settings_are_named() -> None:
    with pytest.raises(EvaluationError, match="model must be one of"):
        EvaluationConfig(model="xgb")
    with pytest.raises(EvaluationError, match="warmup"):
        EvaluationConfig(warmup=1.5)
    with pytest.raises(EvaluationError, match="memory_key"):
        EvaluationConfig(memory_key="ids")
    with pytest.raises(EvaluationError, match="same_time"):
        EvaluationConfig(same_time="wall")


def test_stream_ties_let_an_event_see_the_earlier_events_of_its_second() -> None:
    from reloop.evaluate import prepare_stream

    # ML-100K timestamps are whole seconds: with "stream" ties, a user's second rating in a second counts the first
    seen = {
        mode: prepare_stream(
            EvaluationConfig(limit=3000, slots=2, batch_size=100, same_time=mode, numeric_features=("user_imp_all",))
        )
        for mode in ("stream", "timestamp")
    }
    s, t = (seen[m].encoder.config for m in ("stream", "timestamp"))
    raw_s = seen["stream"].batch["num"][:, 0] * s.numeric_std[0] + s.numeric_mean[0]
    raw_t = seen["timestamp"].batch["num"][:, 0] * t.numeric_std[0] + t.numeric_mean[0]
    assert bool((raw_s >= raw_t - 1e-4).all()) and bool((raw_s > raw_t + 1e-4).any())


def test_cli_writes_json_and_png(tmp_path) -> None:
    from reloop.cli import app

    out = tmp_path / "cli.json"
    res = CliRunner().invoke(
        app, ["evaluate", "--limit", "3000", "--slots", "2", "--no-river", "--model", "lr", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert {"base", "incremental", "base+memory", "incremental+memory"} <= set(doc)
    assert "river_lr" not in doc and out.with_suffix(".png").exists()
    bad = CliRunner().invoke(app, ["evaluate", "--model", "gbdt", "--out", str(out)])
    assert bad.exit_code == 2 and "model must be one of" in bad.output  # an input error: one line, exit 2
