"""`reloop evaluate` with side features and the din model, on a small prefix of MovieLens-100K."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from reloop.evaluate import EvaluationConfig, EvaluationError, prepare_stream


def test_side_features_are_joined_and_encoded() -> None:
    s = prepare_stream(EvaluationConfig(limit=3000, slots=2, batch_size=100, side_features=True, model="din"))
    enc = s.encoder.config
    assert enc.categorical_fields == (
        "user_id",
        "item_id",
        "age_bucket",
        "gender",
        "occupation",
        "zip_prefix",
        "release_year",
    )
    assert enc.bag_fields == ("genres",) and enc.history_field == "user_last_items"
    assert tuple(s.batch["bag"].shape[:2]) == (3000, 1) and bool((s.batch["bag"][:, 0, 0] > 0).all())
    assert bool((s.batch["cat"][:, 2:] > 0).all())  # every ML-100K user has an age; every event's item a year


def test_side_features_need_side_tables(tmp_path) -> None:
    p = tmp_path / "e.csv"
    p.write_text("user_id,item_id,timestamp,label\n" + "".join(f"u{i % 7},i{i % 5},{i},{i % 2}\n" for i in range(400)))
    with pytest.raises(EvaluationError, match="users_path"):
        prepare_stream(EvaluationConfig(dataset=str(p), slots=2, side_features=True))
    users = tmp_path / "users.csv"
    users.write_text("user_id,gender\nu1,F\n")
    s = prepare_stream(EvaluationConfig(dataset=str(p), slots=2, side_features=True, users_path=str(users)))
    assert "gender" in s.encoder.config.categorical_fields and not s.encoder.config.bag_fields


def test_cli_evaluates_din_with_side_features(tmp_path) -> None:
    from reloop.cli import app

    out = tmp_path / "din.json"
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--limit",
            "3000",
            "--slots",
            "2",
            "--no-river",
            "--model",
            "din",
            "--side-features",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["model_config"]["kind"] == "din" and doc["model_config"]["num_bags"] == 1
    assert {"new", "returning"} <= set(doc["cohorts"]["incremental+memory"])
    assert {"base", "incremental", "incremental+memory"} <= set(doc["validation"])
