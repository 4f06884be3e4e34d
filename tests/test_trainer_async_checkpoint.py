"""Checkpoints written off the learning thread: a consistent snapshot, in order, errors not lost."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load

from jobs.examples import write_example_files
from jobs.registry import ModelRegistry
from jobs.trainer import IncrementalTrainer, TrainerConfig, read_checkpoint_state
from reloop.datasets import movielens_examples


@pytest.fixture(scope="module")
def examples():
    return movielens_examples(1200)


def _trainer(tmp_path, examples, **kw) -> IncrementalTrainer:
    write_example_files(examples, str(tmp_path / "ex"), rows_per_file=300)
    cfg = dict(
        examples_uri=str(tmp_path / "ex"),
        checkpoint_dir=str(tmp_path / "ck"),
        registry_uri=str(tmp_path / "reg"),
        batch_size=100,
        checkpoint_every=300,
        checkpoint_seconds=3600,
        idle_exit=0,
        publish_every=1,
    )
    return IncrementalTrainer(TrainerConfig(**{**cfg, **kw}))


def _learn(t: IncrementalTrainer, n: int) -> None:
    for table, pos in t.store.batches(t.position, t.config.batch_size):
        t.learn_batch(table)
        t.position = pos
        if t.learned >= n:
            return


def test_a_checkpoint_in_flight_holds_the_weights_of_its_instant_while_learning_goes_on(tmp_path, examples):
    t = _trainer(tmp_path, examples)
    _learn(t, 300)
    at_snapshot = {k: v.clone() for k, v in t.model.state_dict().items()}
    gate = threading.Event()
    write = t.ckpts.commit
    t.ckpts.commit = lambda *a, **k: (gate.wait(10), write(*a, **k))[1]  # hold the writer thread
    name = t.checkpoint(wait=False)
    _learn(t, 600)  # learning goes on while the write is held
    assert t.learned == 600 and read_checkpoint_state(str(tmp_path / "ck")) is None
    gate.set()
    t.checkpoint()  # waits for the one in flight, then writes its own
    first = load(t.ckpts.read(name, "model.safetensors"))
    assert all(torch.equal(first[k], at_snapshot[k]) for k in at_snapshot)
    assert read_checkpoint_state(str(tmp_path / "ck"))["learned"] == 600
    # one registry version per checkpoint, in order, each with what it had learned at its instant
    reg = ModelRegistry(str(tmp_path / "reg"))
    learned = [reg.entry(v).training_range["learned"] for v in reg.versions()]
    assert learned == [300, 600]


def test_a_failed_write_is_raised_at_the_next_checkpoint_not_lost(tmp_path, examples):
    t = _trainer(tmp_path, examples, publish_every=0)
    _learn(t, 300)

    def broken(*a, **k):
        raise OSError("disk full")

    t.ckpts.commit = broken
    t.checkpoint(wait=False)
    _learn(t, 600)
    with pytest.raises(OSError, match="disk full"):
        t.checkpoint()


def test_the_run_returns_with_its_last_checkpoint_written_and_its_time_budget(tmp_path, examples):
    t = _trainer(tmp_path, examples)
    out = t.run()
    assert read_checkpoint_state(str(tmp_path / "ck"))["learned"] == out["learned"] == examples.num_rows
    assert len(ModelRegistry(str(tmp_path / "reg")).versions()) == examples.num_rows // 300
    assert out["seconds"]["learn"] > 0 and "checkpoint: write (writer thread)" in out["seconds"]
