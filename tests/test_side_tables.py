"""Side tables (user profile, item catalogue): readers, defaults, and point-in-time correctness in Feast."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from online_models.errors import DatasetError
from reloop.side_tables import (
    ITEM_ATTRIBUTES,
    ITEM_BAGS,
    ITEM_SCHEMA,
    USER_ATTRIBUTES,
    USER_SCHEMA,
    join_as_of,
    movielens_100k_items,
    movielens_100k_users,
    read_items_csv,
    read_users_csv,
    to_batch_source,
)

REPO = Path(__file__).resolve().parent.parent / "features"
T = 1_000_000_000  # ms: the moment u1's profile changes


def test_movielens_100k_side_tables_from_the_wheel():
    users, items = movielens_100k_users(), movielens_100k_items()
    assert users.num_rows == 943 and items.num_rows == 1682
    u1 = users.slice(0, 1).to_pylist()[0]
    assert u1 == {
        "user_id": "1",
        "valid_from": 0,
        "age_bucket": "18-24",
        "gender": "M",
        "occupation": "technician",
        "zip_prefix": "857",
    }
    toy = items.slice(0, 1).to_pylist()[0]
    assert toy["release_year"] == "1995" and toy["genres"] == ["Animation", "Children's", "Comedy"]
    assert set(users["age_bucket"].to_pylist()) <= {"<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}


def test_csv_side_tables_document_their_columns_and_default_missing_values(tmp_path):
    u = tmp_path / "users.csv"
    u.write_text("user_id,age,zip,extra\nu1,40,k1a 0b1,x\nu2,,,y\n")
    users = read_users_csv(u)
    assert users.to_pylist() == [
        {
            "user_id": "u1",
            "valid_from": 0,
            "age_bucket": "35-44",
            "gender": None,
            "occupation": None,
            "zip_prefix": "K1A",
        },
        {"user_id": "u2", "valid_from": 0, "age_bucket": None, "gender": None, "occupation": None, "zip_prefix": None},
    ]
    i = tmp_path / "items.csv"
    i.write_text("item_id,genres,valid_from\ni1,Drama|Comedy,5\ni2,,0\n")
    assert read_items_csv(i).to_pylist() == [
        {"item_id": "i1", "valid_from": 5000, "release_year": None, "genres": ["Comedy", "Drama"]},
        {"item_id": "i2", "valid_from": 0, "release_year": None, "genres": []},
    ]
    with pytest.raises(DatasetError, match="missing column user_id"):
        read_users_csv(i)
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,valid_from\ni1,-3\n")
    with pytest.raises(DatasetError, match="valid_from"):
        read_items_csv(bad)
    with pytest.raises(DatasetError, match="no such side-table file"):
        read_users_csv(tmp_path / "nope.csv")


def _two_versions() -> tuple[pa.Table, pa.Table]:
    users = pa.Table.from_pylist(
        [
            {
                "user_id": "u1",
                "valid_from": 0,
                "age_bucket": "18-24",
                "gender": "F",
                "occupation": "student",
                "zip_prefix": "100",
            },
            {
                "user_id": "u1",
                "valid_from": T,
                "age_bucket": "25-34",
                "gender": "F",
                "occupation": "engineer",
                "zip_prefix": "941",
            },
            {
                "user_id": "u2",
                "valid_from": 0,
                "age_bucket": "56+",
                "gender": "M",
                "occupation": None,
                "zip_prefix": "021",
            },
        ],
        schema=USER_SCHEMA,
    )
    items = pa.Table.from_pylist(
        [{"item_id": "i1", "valid_from": 0, "release_year": "1995", "genres": ["Comedy", "Drama"]}], schema=ITEM_SCHEMA
    )
    return users, items


def _examples() -> pa.Table:
    # u1 before, exactly at and after the change; a user and an item without any version
    return pa.table(
        {
            "user_id": ["u1", "u1", "u1", "u2", "nobody"],
            "item_id": ["i1", "i1", "i1", "i9", "i1"],
            "ts": pa.array([T - 1, T, T + 1, T + 5, T + 5], pa.int64()),
            "label": [1, 0, 1, 0, 1],
        }
    )


def test_join_as_of_sees_a_version_from_its_time_on_only():
    users, _ = _two_versions()
    out = join_as_of(_examples(), users, "user_id", USER_ATTRIBUTES)
    assert out["occupation"].to_pylist() == ["student", "engineer", "engineer", None, None]
    assert out["age_bucket"].to_pylist() == ["18-24", "25-34", "25-34", "56+", None]
    assert out["label"].to_pylist() == [1, 0, 1, 0, 1]  # events keep their rows and order


def test_feast_point_in_time_join_and_materialisation_of_two_profile_versions(tmp_path, monkeypatch):
    from jobs.examples import ExampleStore, Position, write_example_files
    from pipelines.config import FeastConfig
    from pipelines.feast_io import (
        apply_repo,
        join_batch_features,
        lookup_batch_features,
        materialize_batch_views,
        open_store,
        write_batch_source,
    )
    from pipelines.side_features import SideTableSource

    repo = tmp_path / "features"
    repo.mkdir()
    for f in ("feature_repo.py", "feature_store.yaml"):
        shutil.copy(REPO / f, repo / f)
    monkeypatch.setenv("RELOOP_FEAST_OFFLINE_ROOT", str(tmp_path / "offline"))
    cfg = FeastConfig(repo_path=str(repo))
    apply_repo(cfg)
    store = open_store(cfg)
    users, items = _two_versions()
    write_batch_source(store, "user_profile", to_batch_source(users), "side")
    write_batch_source(store, "item_catalog", to_batch_source(items), "side")

    # offline: Feast's point-in-time join agrees with join_as_of, row by row
    joined = join_batch_features(store, _examples())
    assert joined["occupation"].to_pylist() == ["student", "engineer", "engineer", None, None]
    assert joined["zip_prefix"].to_pylist() == ["100", "941", "941", "021", None]
    assert joined["genres"].to_pylist() == [["Comedy", "Drama"]] * 3 + [[], ["Comedy", "Drama"]]
    assert joined["release_year"].to_pylist() == ["1995"] * 3 + [None, "1995"]
    ref = join_as_of(
        join_as_of(_examples(), users, "user_id", USER_ATTRIBUTES), items, "item_id", ITEM_ATTRIBUTES + ITEM_BAGS
    )
    for c in USER_ATTRIBUTES + ITEM_ATTRIBUTES:
        assert joined[c].to_pylist() == ref[c].to_pylist(), c
    # the trainer's path: the examples it reads (jobs.examples over pipelines.side_features, from the same
    # batch sources Feast reads) carry what Feast's point-in-time join gives, bags and defaults included
    write_example_files(_examples(), str(tmp_path / "ex"), rows_per_file=2)
    ex = ExampleStore(str(tmp_path / "ex"), side=SideTableSource(str(tmp_path / "offline")))
    mine = pa.concat_tables([b for b, _ in ex.batches(Position(), 2)])
    for c in USER_ATTRIBUTES + ITEM_ATTRIBUTES + ITEM_BAGS:
        assert mine[c].to_pylist() == joined[c].to_pylist(), c

    # online: materialize up to before the change serves the old version, materialize-incremental the new one
    materialize_batch_views(store, end_ms=T - 1)
    got = lookup_batch_features(store, ["u1", "nobody"], ["i1", "i9"])
    assert got["occupation"].to_pylist() == ["student", None]
    assert got["genres"].to_pylist() == [["Comedy", "Drama"], []]
    store = open_store(cfg)  # a fresh handle sees the registry's materialisation intervals
    assert store.get_feature_view("user_profile").most_recent_end_time is not None
    materialize_batch_views(store, end_ms=T + 10)
    got = lookup_batch_features(store, ["u1", "u2"], ["i1", "i1"])
    assert got["occupation"].to_pylist() == ["engineer", None]
    assert got["age_bucket"].to_pylist() == ["25-34", "56+"]


def test_feature_services_with_side_views_exist_for_every_model_kind():
    from online_models.models import KINDS
    from pipelines.feast_io import repo_objects

    objs = {o.name: o for o in repo_objects(REPO)}
    for kind in KINDS:
        svc = objs[f"ctr_{kind}_side_v1"]
        assert [p.name for p in svc.feature_view_projections] == [
            "user_stats",
            "item_stats",
            "user_profile",
            "item_catalog",
        ]
    assert [f.name for f in objs["user_profile"].features] == list(USER_ATTRIBUTES)
    assert [f.name for f in objs["item_catalog"].features] == list(ITEM_ATTRIBUTES + ITEM_BAGS)
