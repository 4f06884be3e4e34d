"""The incremental trainer without Ray: test-then-train, checkpoints, exact resume after a crash."""

from __future__ import annotations

import pytest
import torch

from jobs.examples import write_example_files
from jobs.registry import ModelRegistry
from jobs.trainer import IncrementalTrainer, TrainerConfig, event_digest, read_checkpoint_state
from reloop.datasets import movielens_examples


@pytest.fixture(scope="module")
def examples():
    return movielens_examples(2400)


def _config(tmp_path, name="ck", **kw) -> TrainerConfig:
    base = dict(
        examples_uri=str(tmp_path / "ex"),
        checkpoint_dir=str(tmp_path / name),
        batch_size=100,
        checkpoint_every=300,
        checkpoint_seconds=3600,
        idle_exit=0,
        model_kind="dcnv2",
    )
    base.update(kw)
    return TrainerConfig(**base)


def test_crash_and_resume_learns_every_example_once_and_matches_an_uninterrupted_run(tmp_path, examples):
    write_example_files(examples.slice(0, 1600), str(tmp_path / "ex"), rows_per_file=450)
    # run A: learn 8 batches (checkpoints at 300 and 650), then "crash" (no final checkpoint)
    a = IncrementalTrainer(_config(tmp_path))
    learned = 0
    for table, pos in a.store.batches(a.position, a.config.batch_size):
        a.learn_batch(table)
        a.position = pos
        a._since_ckpt += table.num_rows
        learned += table.num_rows
        if a._due():
            a.checkpoint()
        if learned >= 750:
            break
    del a
    state = read_checkpoint_state(str(tmp_path / "ck"))
    assert state["learned"] == 650 and state["position"]["partial"] == ["part-000001.parquet", 200]
    # more examples arrive while it is down
    write_example_files(examples.slice(1600), str(tmp_path / "ex"), rows_per_file=450, start=10)
    b = IncrementalTrainer(_config(tmp_path))
    assert b.learned == 650 and b.runs[-1]["resumed_from"] == "ckpt-000002"
    out = b.run()
    assert out["learned"] == examples.num_rows
    final = read_checkpoint_state(str(tmp_path / "ck"))
    assert final["learned"] == examples.num_rows
    assert int(final["digest"], 16) == event_digest(examples["event_id"].to_pylist())
    # the prediction log holds every example exactly once (the replayed batch overwrote its part)
    import pyarrow.parquet as pq

    preds = pq.read_table(str(tmp_path / "ck" / "predictions"))
    assert sorted(preds["event_id"].to_pylist()) == sorted(examples["event_id"].to_pylist())
    # and the resumed weights equal those of a run that never crashed (optimizer and RNG state restored)
    c = IncrementalTrainer(_config(tmp_path, name="ck-clean"))
    c.run()
    for k, v in c.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_test_then_train_scores_before_learning(tmp_path, examples):
    write_example_files(examples.slice(0, 200), str(tmp_path / "ex"), rows_per_file=200)
    t = IncrementalTrainer(_config(tmp_path))
    batch = examples.slice(0, 200)
    first = t.learn_batch(batch)
    # the model was built (initial weights) just for this batch: predictions are ~0.5 before any update
    assert abs(float(first.mean()) - 0.5) < 0.05
    second = t.learn_batch(batch)
    assert not (first == second).all()


def test_publish_to_registry_with_metrics(tmp_path, examples):
    write_example_files(examples.slice(0, 600), str(tmp_path / "ex"), rows_per_file=300)
    reg_uri = str(tmp_path / "reg")
    t = IncrementalTrainer(_config(tmp_path, registry_uri=reg_uri, publish_every=1, promote=True))
    t.run()
    reg = ModelRegistry(reg_uri)
    assert reg.current() == reg.versions()[-1] and len(reg.versions()) == 2
    entry, _ = reg.load()
    assert entry.training_range["learned"] == 600 and "logloss" in entry.metrics
    assert entry.extra["encoder"]["numeric_fields"]  # the serving side rebuilds the same encoder


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, examples):
    from jobs.trainer import TrainerError

    write_example_files(examples.slice(0, 300), str(tmp_path / "ex"), rows_per_file=300)
    IncrementalTrainer(_config(tmp_path)).run()
    ck = tmp_path / "ck"
    name = read_checkpoint_state(str(ck)) and open(ck / "LATEST").read()
    d = ck / __import__("json").loads(name)["name"]
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TrainerError, match="cannot be restored"):
        IncrementalTrainer(_config(tmp_path))


def test_checkpoints_on_a_non_local_filesystem(tmp_path, examples):
    """fsspec memory:// stands in for an object store: whole-object writes, LATEST written last."""
    import uuid

    write_example_files(examples.slice(0, 600), str(tmp_path / "ex"), rows_per_file=300)
    uri = f"memory://ckpt-{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path, max_examples=300, idle_exit=None)
    cfg = TrainerConfig(**{**cfg.__dict__, "checkpoint_dir": uri})
    a = IncrementalTrainer(cfg)
    a.run()
    assert read_checkpoint_state(uri)["learned"] == 300
    b = IncrementalTrainer(TrainerConfig(**{**cfg.__dict__, "max_examples": None, "idle_exit": 0}))
    assert b.learned == 300
    b.run()
    final = read_checkpoint_state(uri)
    assert final["learned"] == 600
    assert int(final["digest"], 16) == event_digest(examples.slice(0, 600)["event_id"].to_pylist())
