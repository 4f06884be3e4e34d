"""Batch entity features at ``/score`` (issue 17), with a real SQLite Feast repo.

A model whose encoder reads the side attributes (user profile, item catalogue) is deployed; ``/score``
fetches them with the streaming features in one ``get_online_features`` call, whether the model's feature
service declares the batch views (``ctr_deepfm_side_v1``) or not (``ctr_deepfm_v1``: the lookup adds the
refs its encoder needs). Unknown users and items get the documented defaults (None: the encoder's
bucket 0; an empty bag), including a slate where no candidate has a catalogue entry.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

from jobs.feedback import FeedbackGuard, GuardConfig
from jobs.registry import ModelRegistry
from jobs.scoring import FeastLookup, Scorer, ScorerConfig
from jobs.serve import handle, prepare_feature_store
from online_models.encoding import EncoderConfig, FeatureEncoder
from online_models.models import ModelConfig, build_model
from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES
from reloop.datasets import load_dataset
from reloop.side_tables import ITEM_ATTRIBUTES, ITEM_BAGS, USER_ATTRIBUTES, load_side_tables

pytestmark = pytest.mark.integration
SIDE = USER_ATTRIBUTES + ITEM_ATTRIBUTES
BUCKETS = 1009


@pytest.fixture(scope="module")
def side_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("side")
    users, items = load_side_tables("movielens-100k")
    store = prepare_feature_store(
        str(root / "features"), load_dataset("movielens-100k", limit=3000), users=users, items=items
    )
    return {"root": root, "store": store, "users": users, "items": items}


def publish_side_model(root, feature_service: str) -> ModelRegistry:
    """A DeepFM over ids + side attributes + the streaming numbers (seeded weights), as its own registry."""
    cat = ("user_id", "item_id") + SIDE
    numeric = tuple(USER_FEATURES) + tuple(ITEM_FEATURES)
    enc = EncoderConfig(categorical_fields=cat, numeric_fields=numeric, bag_fields=ITEM_BAGS, hash_buckets=BUCKETS)
    mc = ModelConfig(
        kind="deepfm",
        num_categorical=len(cat),
        num_numeric=len(numeric),
        num_bags=len(ITEM_BAGS),
        hash_buckets=BUCKETS,
        categorical_fields=cat,
        numeric_fields=numeric,
        seed=3,
    )
    torch.manual_seed(3)
    model = build_model(mc)
    with torch.no_grad():  # visible embeddings, so a side attribute moves the score
        for p in model.parameters():
            p.normal_(0, 0.3)
    reg = ModelRegistry(str(root / f"reg-{feature_service}"))
    reg.publish(
        model.state_dict(),
        model_config=mc.to_dict(),
        feature_service=feature_service,
        extra={"encoder": enc.to_dict()},
        training_range={"trained_until_ts": 0},
        promote=True,
    )
    return reg


class CountingStore:
    """The Feast store, counting ``get_online_features`` calls."""

    def __init__(self, store) -> None:
        self.store, self.calls = store, 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def get_online_features(self, **kw):
        self.calls += 1
        return self.store.get_online_features(**kw)


@pytest.fixture(params=["ctr_deepfm_side_v1", "ctr_deepfm_v1"])
def served(request, side_world):
    reg = publish_side_model(side_world["root"], request.param)
    store = CountingStore(side_world["store"])
    sc = Scorer(reg, lambda fs: FeastLookup(store, fs), ScorerConfig(use_memory=False))
    sc.reload()
    yield sc, store, FeedbackGuard(GuardConfig())
    sc.close()


def score(sc, guard, body: dict) -> dict:
    status, out = handle(sc, "POST", "/score", json.dumps(body).encode(), guard)
    assert status == 200, out
    return out


def served_row(guard, impression_id: str) -> pa.Table:
    return guard.impressions.get(impression_id).payload.row


def test_score_reads_the_side_attributes_in_the_same_feast_call(served, side_world):
    sc, store, guard = served
    users, items = side_world["users"], side_world["items"]
    want_u = {c: users.filter(pa.compute.equal(users["user_id"], "259"))[c][0].as_py() for c in USER_ATTRIBUTES}
    cands = ["255", "286", "298"]
    before = store.calls
    out = score(sc, guard, {"user_id": "259", "candidates": cands})
    assert store.calls - before == 1  # one Feast call for the slate, side features included
    for r in out["ranking"]:
        row = served_row(guard, r["impression_id"])
        assert {c: row[c][0].as_py() for c in USER_ATTRIBUTES} == want_u
        it = items.filter(pa.compute.equal(items["item_id"], r["item_id"]))
        assert row["release_year"][0].as_py() == it["release_year"][0].as_py()
        assert row["genres"][0].as_py() == it["genres"][0].as_py() and row["genres"][0].as_py()
        assert row["user_imp_all"][0].as_py() > 0  # and the streaming features beside them
    # the model uses them: blanking the profile changes the score
    row = served_row(guard, out["ranking"][0]["impression_id"])
    blank = row
    for c in USER_ATTRIBUTES:
        blank = blank.set_column(blank.column_names.index(c), c, pa.array([None], pa.string()))
    p_real, p_blank = (float(sc._forward(sc.bundle, t)[0][0]) for t in (row, blank))
    assert abs(p_real - out["ranking"][0]["base_probability"]) < 1e-6 and abs(p_real - p_blank) > 1e-4


def test_unknown_users_and_items_get_the_documented_defaults(served):
    sc, store, guard = served
    out = score(sc, guard, {"user_id": "nobody", "candidates": ["no-such-item", "nor-this"]})
    enc: FeatureEncoder = sc.bundle.encoder
    for r in out["ranking"]:
        row = served_row(guard, r["impression_id"])
        assert all(row[c][0].as_py() is None for c in SIDE) and row["genres"][0].as_py() == []
        batch = enc.encode(row)
        fields = enc.config.categorical_fields
        for c in SIDE:  # bucket 0 of each side field: "missing"
            assert int(batch["cat"][0, fields.index(c)]) == fields.index(c) * BUCKETS
        assert int(batch["bag"].abs().sum()) == 0  # the empty bag pools to zeros
        assert 0 < r["base_probability"] < 1
    # a known user with unknown items, and one pair of an unknown user: scored, not refused
    assert score(sc, guard, {"user_id": "13", "candidates": ["no-such-item"]})["ranking"][0]["probability"] > 0
    assert 0 < score(sc, guard, {"user_id": "nobody", "item_id": "100"})["probability"] < 1
