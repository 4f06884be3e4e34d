"""Side features in the streaming loop (issue 17): the incremental trainer, the retrain's example store and the
serving loop of ``reloop run`` join the side tables point in time from the batch sources Feast reads, and a
side-feature version published by the trainer scores at ``/score`` with Feast's batch views."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from jobs.examples import ExampleStore, write_example_files
from jobs.feedback import FeedbackGuard, GuardConfig
from jobs.registry import ModelRegistry
from jobs.retrain import RetrainConfig, _store
from jobs.scoring import FeastLookup, Scorer, ScorerConfig
from jobs.serve import handle, prepare_feature_store
from jobs.trainer import IncrementalTrainer, TrainerConfig, TrainerError
from online_models.encoding import stable_bucket
from online_models.settings import SERVING_MEMORY
from pipelines.side_features import (
    ITEM_ATTRIBUTES,
    ITEM_BAGS,
    ITEM_SCHEMA,
    SIDE_BAGS,
    SIDE_CATEGORICAL,
    USER_ATTRIBUTES,
    USER_SCHEMA,
    SideTables,
    SideTableSource,
    read_batch_sources,
    sort_versions,
    write_side_tables,
)
from reloop.datasets import load_dataset, movielens_examples
from reloop.live import ServingLoop
from reloop.side_tables import load_side_tables


@pytest.fixture(scope="module")
def examples():
    return movielens_examples(900)


def _profiles(user: str, t: int) -> pa.Table:
    """Two versions of ``user``'s profile: a student until ``t``, an engineer from ``t`` on."""
    return pa.Table.from_pylist(
        [
            {"user_id": user, "valid_from": 0, "age_bucket": "18-24", "gender": "F", "occupation": "student"},
            {"user_id": user, "valid_from": t, "age_bucket": "25-34", "gender": "F", "occupation": "engineer"},
        ],
        schema=USER_SCHEMA,
    )


def _config(tmp_path, side: str | None, **kw) -> TrainerConfig:
    base = dict(
        examples_uri=str(tmp_path / "ex"),
        checkpoint_dir=str(tmp_path / "ck"),
        batch_size=100,
        checkpoint_every=300,
        checkpoint_seconds=3600,
        idle_exit=0,
        side_tables_uri=side,
    )
    base.update(kw)
    return TrainerConfig(**base)


def test_batch_sources_round_trip_and_the_source_sees_new_versions(tmp_path):
    users, items = load_side_tables("movielens-100k")
    write_side_tables(str(tmp_path / "side"), users, items, "r1")
    u, i = read_batch_sources(str(tmp_path / "side"))
    assert u.equals(sort_versions(users, "user_id")) and i.equals(sort_versions(items, "item_id"))
    src = SideTableSource(str(tmp_path / "side"), refresh_seconds=0)
    ev = pa.table({"user_id": ["1"], "item_id": ["1"], "ts": pa.array([10**13], pa.int64())})
    assert src.join(ev)["occupation"].to_pylist() == ["technician"]
    # a later file with a new version of user 1 (valid from 5e12 ms) reaches the long-lived reader
    write_side_tables(str(tmp_path / "side"), _profiles("1", 5 * 10**12), None, "r2")
    assert src.join(ev)["occupation"].to_pylist() == ["engineer"]


def test_the_trainer_joins_two_profile_versions_point_in_time(tmp_path, examples):
    ex = examples.slice(0, 600)
    write_example_files(ex, str(tmp_path / "ex"), rows_per_file=600)
    ts = ex["ts"].to_numpy()
    user = ex["user_id"][0].as_py()
    t_change = int(np.median(ts[np.asarray(ex["user_id"].to_pylist()) == user]))
    items = pa.Table.from_pylist(
        [{"item_id": ex["item_id"][0].as_py(), "valid_from": 0, "release_year": "1995", "genres": ["Comedy"]}],
        schema=ITEM_SCHEMA,
    )
    write_side_tables(str(tmp_path / "side"), _profiles(user, t_change), items, "side")
    t = IncrementalTrainer(_config(tmp_path, str(tmp_path / "side")))
    assert t.config.feature_service == "ctr_dcnv2_side_v1"
    table, _ = next(t.store.batches(t.position, 600))
    mine = pc.equal(table["user_id"], user)
    occ = table.filter(mine)["occupation"].to_pylist()
    want = ["student" if s < t_change else "engineer" for s in table.filter(mine)["ts"].to_pylist()]
    assert occ == want and "student" in occ and "engineer" in occ
    others = table.filter(pc.invert(mine))
    assert set(others["occupation"].to_pylist()) == {None}  # users without a profile: the default
    genres = table["genres"].to_pylist()
    assert {tuple(g) for g in genres} == {(), ("Comedy",)}  # items without a catalogue row: the empty bag
    t.learn_batch(table)
    enc = t.encoder.config
    assert enc.categorical_fields == ("user_id", "item_id") + SIDE_CATEGORICAL and enc.bag_fields == SIDE_BAGS
    assert t.model_config["num_bags"] == len(SIDE_BAGS)
    assert t.model_config["num_categorical"] == 2 + len(SIDE_CATEGORICAL)
    # the encoder hashes the version valid at each row's time into the occupation field
    j = enc.categorical_fields.index("occupation")
    cat = t.encoder.encode(table.filter(mine))["cat"][:, j].numpy() - j * enc.hash_buckets
    assert cat.tolist() == [stable_bucket("occupation", o, enc.hash_buckets) for o in want]
    t.checkpoint()
    # a checkpoint of a side-feature encoder cannot resume without the side tables (a clear error)
    with pytest.raises(TrainerError, match="side attributes"):
        IncrementalTrainer(_config(tmp_path, None))
    # the retrain's window is read through the same join
    rc = RetrainConfig(
        examples_uri=str(tmp_path / "ex"),
        registry_uri=str(tmp_path / "reg"),
        storage_path=str(tmp_path / "rt"),
        side_tables_uri=str(tmp_path / "side"),
    )
    assert rc.feature_service == "ctr_dcnv2_side_v1"
    window = _store(rc).read_window().filter(pc.equal(pc.field("user_id"), user))
    assert window["occupation"].to_pylist() == [
        "student" if s < t_change else "engineer" for s in window["ts"].to_pylist()
    ]


@pytest.fixture(scope="module")
def feast_world(tmp_path_factory):
    """A real SQLite Feast repo with the batch views materialised (as `reloop side-tables` leaves it)."""
    root = tmp_path_factory.mktemp("side-loop")
    users, items = load_side_tables("movielens-100k")
    store = prepare_feature_store(
        str(root / "features"), load_dataset("movielens-100k", limit=3000), users=users, items=items
    )
    return {"root": root, "store": store, "offline": str(root / "features" / "data" / "offline")}


@pytest.mark.integration
def test_a_side_feature_version_from_the_trainer_scores_at_score_and_in_the_serving_loop(
    tmp_path, examples, feast_world
):
    offline = feast_world["offline"]
    # the trainer reads exactly the files Feast's batch views read (its offline directory)
    assert SideTables.read(offline).users.num_rows == 943
    write_example_files(examples.slice(0, 600), str(tmp_path / "ex"), rows_per_file=300)
    reg_uri = str(tmp_path / "reg")
    t = IncrementalTrainer(_config(tmp_path, offline, registry_uri=reg_uri, publish_every=1, promote=True))
    t.run()
    reg = ModelRegistry(reg_uri)
    entry = reg.entry(reg.current())
    assert entry.feature_service == "ctr_dcnv2_side_v1"
    assert set(SIDE_CATEGORICAL) <= set(entry.extra["encoder"]["categorical_fields"])

    # /score: the served version's encoder reads the batch views from Feast in the same lookup
    sc = Scorer(reg, lambda fs: FeastLookup(feast_world["store"], fs), ScorerConfig(use_memory=False))
    sc.reload()
    guard = FeedbackGuard(GuardConfig())
    try:
        status, out = handle(
            sc, "POST", "/score", json.dumps({"user_id": "1", "candidates": ["1", "50"]}).encode(), guard
        )
        assert status == 200, out
        for r in out["ranking"]:
            row = guard.impressions.get(r["impression_id"]).payload.row
            assert row["occupation"][0].as_py() == "technician" and row["genres"][0].as_py()
            assert 0 < r["base_probability"] < 1
        # the same row through the trainer's join gives the same side attributes Feast served
        served = guard.impressions.get(out["ranking"][0]["impression_id"]).payload.row
        item = out["ranking"][0]["item_id"]
        joined = SideTables.read(offline).join(pa.table({"user_id": ["1"], "item_id": [item], "ts": [10**13]}))
        for c in USER_ATTRIBUTES + ITEM_ATTRIBUTES + ITEM_BAGS:
            assert served[c][0].as_py() == joined[c][0].as_py(), c
        # an unknown user and item: the defaults, never an error
        status, out = handle(
            sc, "POST", "/score", json.dumps({"user_id": "nobody", "item_id": "nothing"}).encode(), guard
        )
        assert status == 200 and 0 < out["probability"] < 1
    finally:
        sc.close()

    # reloop run's serving loop: examples after the version's horizon are scored with the joined attributes
    write_example_files(examples.slice(600), str(tmp_path / "ex"), rows_per_file=300, start=10)
    loop = ServingLoop(str(tmp_path / "ex"), reg, dict(SERVING_MEMORY), side=SideTableSource(offline))
    while loop.step():
        pass
    assert loop.scored == examples.num_rows - 600
    recent = loop.recent()
    assert set(SIDE_CATEGORICAL + SIDE_BAGS) <= set(recent.column_names)
    assert ExampleStore(str(tmp_path / "ex")).read_window().num_rows == examples.num_rows
    # without the side tables the side version cannot encode the examples: that loop must be given them
    with pytest.raises(Exception, match="missing column"):
        bare = ServingLoop(str(tmp_path / "ex"), reg, dict(SERVING_MEMORY))
        while bare.step():
            pass


def test_the_trainer_command_line_takes_the_side_tables(tmp_path):
    from jobs.trainer import parse_args

    tc, _ = parse_args(["--examples", str(tmp_path / "ex"), "--side-tables", str(tmp_path / "side")])
    assert tc.side_tables_uri == str(tmp_path / "side") and tc.feature_service == "ctr_dcnv2_side_v1"
    tc, _ = parse_args(["--examples", str(tmp_path / "ex")])
    assert tc.side_tables_uri is None and tc.feature_service == "ctr_dcnv2_v1"


def test_a_run_with_side_features_on_a_dataset_without_side_tables_is_refused_up_front(tmp_path):
    from reloop.config import ReloopConfig
    from reloop.run import LoopRun, RunError, RunOptions

    opts = RunOptions(dataset="synthetic:stable?n=100", side_features=True, state_root=str(tmp_path / "runs"))
    with pytest.raises(RunError, match="no side tables of its own"):
        LoopRun(ReloopConfig(), opts)
