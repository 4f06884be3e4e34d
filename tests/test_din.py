"""DIN and the bag fields: shapes, masking, the memory key, learning, and River seeing the same inputs."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from online_models.encoding import EncoderConfig, FeatureEncoder
from online_models.learner import LearnerConfig, OnlineLearner
from online_models.models import ModelConfig, ModelConfigError, build_model, memory_key, memory_key_dim
from online_models.river_baselines import RiverBaseline


def _table() -> pa.Table:
    return pa.table(
        {
            "user_id": ["u1", "u2", "u3", None],
            "item_id": ["i1", "i2", "i1", "i3"],
            "gender": ["F", None, "M", "F"],
            "genres": pa.array([["Comedy", "Drama"], [], None, ["Drama"]], pa.list_(pa.string())),
            "user_last_items": pa.array([["i2", "i3"], [], ["i1"], None], pa.list_(pa.string())),
            "label": [1, 0, 1, 0],
        }
    )


def _encoder() -> FeatureEncoder:
    return FeatureEncoder(
        EncoderConfig(
            categorical_fields=("user_id", "item_id", "gender"),
            bag_fields=("genres",),
            hash_buckets=101,
            history_field="user_last_items",
            history_len=4,
            bag_len=3,
        )
    )


def test_bags_are_hashed_in_their_own_block_and_padded():
    enc = _encoder()
    b = enc.encode(_table())
    assert tuple(b["bag"].shape) == (4, 1, 3) and enc.vocab_size == 4 * 101
    nz = b["bag"][b["bag"] > 0]
    assert bool(((nz >= 3 * 101) & (nz < 4 * 101)).all())  # the block after the 3 categorical fields
    assert b["bag"][1].sum() == 0 and b["bag"][2].sum() == 0  # empty and null bags are all padding
    assert int(b["bag"][0, 0, 1]) == int(b["bag"][3, 0, 0])  # "Drama" is one bucket wherever it appears


@pytest.mark.parametrize("kind", ["lr", "deepfm", "dcnv2", "din"])
def test_every_kind_pools_bags_and_exposes_its_memory_key(kind):
    enc = _encoder()
    cfg = ModelConfig(kind=kind, num_categorical=3, num_bags=1, hash_buckets=101, use_history=True, seed=0)
    model = build_model(cfg)
    b = enc.encode(_table())
    logits, hidden = model(b)
    assert tuple(logits.shape) == (4,) and tuple(hidden.shape) == (4, model.hidden_dim)
    key = memory_key(model, b, hidden, "hidden+user")
    assert key.shape[1] == memory_key_dim(model, "hidden+user")
    learner = OnlineLearner(model, LearnerConfig(lr=0.05, optimizer="adagrad", seed=0))
    before = learner.predict_proba(b)
    for _ in range(30):
        learner.learn(b)
    after = learner.predict_proba(b)
    assert float(after[0] - after[1]) > float(before[0] - before[1])  # learns the labels


def test_din_attention_ignores_padding_and_needs_a_history():
    enc = _encoder()
    model = build_model(ModelConfig(kind="din", num_categorical=3, num_bags=1, hash_buckets=101, use_history=True))
    b = enc.encode(_table())
    w = model.attention_weights(b)
    assert bool((w[b["hist"] == 0] == 0).all()) and bool((w[0, :2] != 0).all())
    # a changed padding slot changes nothing; a changed history item changes the score
    p = model.eval()(b)[0]
    b2 = dict(b, hist=b["hist"].clone())
    b2["hist"][1, 3] = 0
    assert torch.allclose(model(b2)[0], p)
    b2["hist"][0, 0] = b["cat"][2, 1]
    assert not torch.allclose(model(b2)[0][0], p[0])
    with pytest.raises(ModelConfigError, match="use_history"):
        build_model(ModelConfig(kind="din", num_categorical=2))


def test_river_sees_the_bag_values():
    b = _encoder().encode(_table())
    x = RiverBaseline("lr").to_dicts(b)
    genre_keys = [k for k in x[0] if int(k[1:]) >= 3 * 101]
    assert len(genre_keys) == 2 and all(x[0][k] == 0.5 for k in genre_keys)
    assert all(int(k[1:]) < 3 * 101 for k in x[1])  # an empty bag adds nothing


def test_the_incremental_trainer_runs_din_over_the_examples_last_items(tmp_path):
    from jobs.examples import write_example_files
    from jobs.trainer import IncrementalTrainer, TrainerConfig
    from reloop.datasets import movielens_examples

    examples = movielens_examples(300)
    write_example_files(examples, str(tmp_path / "ex"), rows_per_file=300)
    t = IncrementalTrainer(
        TrainerConfig(
            examples_uri=str(tmp_path / "ex"),
            checkpoint_dir=str(tmp_path / "ck"),
            batch_size=100,
            idle_exit=0,
            model_kind="din",
        )
    )
    p = t.learn_batch(examples.slice(0, 100))
    assert tuple(p.shape) == (100,)
    assert t.encoder.config.history_field == "user_last_items" and t.model_config["use_history"]
    assert "hist" in t.encoder.encode(examples.slice(0, 5))
