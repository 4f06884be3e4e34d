"""Side tables of a dataset: the user profile and the item catalogue, with versions in time.

Two Arrow tables with fixed columns (the Feast batch views ``user_profile`` and
``item_catalog`` in :mod:`features.feature_repo` declare exactly these):

- users: ``user_id``, ``valid_from`` (int64 epoch ms), ``age_bucket``, ``gender``,
  ``occupation``, ``zip_prefix`` (strings);
- items: ``item_id``, ``valid_from``, ``release_year`` (string), ``genres``
  (list<string>, a bag).

A row is one *version* of an entity's attributes, valid from ``valid_from`` until
the entity's next version. An event at time ``t`` sees the newest version with
``valid_from <= t`` (Feast's point-in-time rule, so :func:`join_as_of` and
``get_historical_features`` agree); an entity without such a version, and any
missing attribute, is null (the encoder's bucket 0, "missing"; an empty bag), so
an unknown user is never an error at training or serving time. The join itself, and the
batch-source layout the trainer, the retrain, ``reloop run`` and ``reloop evaluate`` read, live in
:mod:`pipelines.side_features` (below the job layer); this module reads the datasets' own tables.

Sources:

- ``movielens-100k``: ``ml-100k.user`` and ``ml-100k.item`` from the installed
  ``recbole`` wheel (never imported, never copied). One version per entity,
  valid from the epoch (ML-100K has no history of profiles).
- CSV files (``--users PATH`` / ``--items PATH``), with a header:
  users: ``user_id`` (required), ``valid_from`` (unix seconds, optional, default 0),
  ``age`` (years, bucketed as below) or ``age_bucket``, ``gender``, ``occupation``,
  ``zip`` (first 3 characters kept) or ``zip_prefix``;
  items: ``item_id`` (required), ``valid_from``, ``release_year``, ``genres``
  (``|``-separated). Absent columns and empty cells are missing; other columns
  are ignored.

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> p = os.path.join(d, "users.csv")
>>> _ = open(p, "w").write("user_id,age,gender,valid_from\\nu1,23,F,0\\nu1,31,F,100\\nu2,,M,0\\n")
>>> users = read_users_csv(p)
>>> users.column("age_bucket").to_pylist(), users.column("occupation").to_pylist()
(['18-24', '25-34', None], [None, None, None])
>>> import pyarrow as pa
>>> ev = pa.table({"user_id": ["u1", "u1", "u3"], "ts": [99_999, 100_000, 5]})
>>> join_as_of(ev, users, "user_id", USER_ATTRIBUTES).column("age_bucket").to_pylist()
['18-24', '25-34', None]
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from online_models.errors import DatasetError
from pipelines.feast_io import (
    ITEM_CATALOG_VIEW,
    USER_PROFILE_VIEW,
    apply_repo,
    materialize_batch_views,
    open_store,
    write_batch_source,
)
from pipelines.side_features import (  # noqa: F401  (the columns and the join live below reloop; re-exported)
    ITEM_ATTRIBUTES,
    ITEM_BAGS,
    ITEM_SCHEMA,
    USER_ATTRIBUTES,
    USER_SCHEMA,
    join_as_of,
    sort_versions,
    to_batch_source,
)
from reloop.datasets import MOVIELENS_100K

#: (lower bound in years, label): the MovieLens-1M age groups
AGE_BUCKETS = ((0, "<18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+"))
ZIP_PREFIX_LEN = 3


def age_bucket(age: int | None) -> str | None:
    """The age group of an age in years (None, negative: missing).

    >>> [age_bucket(a) for a in (7, 18, 24, 25, 60, None)]
    ['<18', '18-24', '18-24', '25-34', '56+', None]
    """
    if age is None or age < 0:
        return None
    label = AGE_BUCKETS[0][1]
    for lo, name in AGE_BUCKETS:
        if age >= lo:
            label = name
    return label


def _recbole_file(name: str) -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "MovieLens-100K side tables come from the PyPI wheel recbole==1.2.1, which is not "
            "installed; run `pip install --no-deps recbole==1.2.1`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / name
    if not path.is_file():
        raise DatasetError(f"recbole is installed but {path} is missing; reinstall recbole==1.2.1")
    return path


def _read_tsv(path: Path) -> dict[str, list]:
    # RecBole's atomic files: a tab-separated header of "name:type"; read as strings (titles hold commas/quotes)
    table = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
    )
    table = table.rename_columns([c.split(":")[0] for c in table.column_names])
    return {c: pc.cast(table[c], pa.string()).to_pylist() for c in table.column_names}


def _none_if_empty(v: str | None) -> str | None:
    v = None if v is None else str(v).strip()
    return v or None


def _int_or_none(v: str | None) -> int | None:
    v = _none_if_empty(v)
    try:
        return int(float(v)) if v is not None else None
    except ValueError:
        return None


def _zip_prefix(v: str | None) -> str | None:
    v = _none_if_empty(v)
    return v[:ZIP_PREFIX_LEN].upper() if v else None


def movielens_100k_users() -> pa.Table:
    """The 943 ML-100K users: age group, gender, occupation, zip prefix; valid from the epoch."""
    d = _read_tsv(_recbole_file("ml-100k.user"))
    return pa.Table.from_pydict(
        {
            "user_id": d["user_id"],
            "valid_from": [0] * len(d["user_id"]),
            "age_bucket": [age_bucket(_int_or_none(a)) for a in d["age"]],
            "gender": [_none_if_empty(g) for g in d["gender"]],
            "occupation": [_none_if_empty(o) for o in d["occupation"]],
            "zip_prefix": [_zip_prefix(z) for z in d["zip_code"]],
        },
        schema=USER_SCHEMA,
    )


def movielens_100k_items() -> pa.Table:
    """The 1,682 ML-100K movies: release year and genres (a bag); valid from the epoch."""
    d = _read_tsv(_recbole_file("ml-100k.item"))
    return pa.Table.from_pydict(
        {
            "item_id": d["item_id"],
            "valid_from": [0] * len(d["item_id"]),
            "release_year": [_none_if_empty(y) for y in d["release_year"]],
            "genres": [sorted(set((g or "").split())) for g in d["class"]],
        },
        schema=ITEM_SCHEMA,
    )


def _read_csv(path: str | Path, key: str) -> dict[str, list]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such side-table file (a CSV with a header; see reloop.side_tables)")
    try:
        table = pacsv.read_csv(
            path, convert_options=pacsv.ConvertOptions(column_types={key: pa.string()}, strings_can_be_null=True)
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"{path}: cannot be read: {e}") from e
    if key not in table.column_names:
        raise DatasetError(f"{path}: missing column {key}; found: {', '.join(table.column_names)}")
    n = table.num_rows
    d = {c: pc.cast(table[c], pa.string()).to_pylist() for c in table.column_names}
    d.setdefault("valid_from", ["0"] * n)
    valid = [_int_or_none(v) for v in d["valid_from"]]
    if any(v is None or v < 0 for v in valid):
        raise DatasetError(f"{path}: column valid_from must hold non-negative unix seconds")
    d["valid_from"] = [int(v) * 1000 for v in valid if v is not None]
    if any(k is None for k in d[key]):
        raise DatasetError(f"{path}: column {key} has empty values")
    return d


def read_users_csv(path: str | Path) -> pa.Table:
    """A users CSV (columns in the module docstring) as a users side table."""
    d = _read_csv(path, "user_id")
    n = len(d["user_id"])
    none = [None] * n
    buckets = d["age_bucket"] if "age_bucket" in d else [age_bucket(_int_or_none(a)) for a in d.get("age", none)]
    zips = d["zip_prefix"] if "zip_prefix" in d else [_zip_prefix(z) for z in d.get("zip", none)]
    return sort_versions(
        pa.Table.from_pydict(
            {
                "user_id": d["user_id"],
                "valid_from": d["valid_from"],
                "age_bucket": [_none_if_empty(b) for b in buckets],
                "gender": [_none_if_empty(g) for g in d.get("gender", none)],
                "occupation": [_none_if_empty(o) for o in d.get("occupation", none)],
                "zip_prefix": [_none_if_empty(z) for z in zips],
            },
            schema=USER_SCHEMA,
        ),
        "user_id",
    )


def read_items_csv(path: str | Path) -> pa.Table:
    """An items CSV (columns in the module docstring) as an items side table."""
    d = _read_csv(path, "item_id")
    none = [None] * len(d["item_id"])
    genres = [sorted({g.strip() for g in (v or "").split("|") if g.strip()}) for v in d.get("genres", none)]
    return sort_versions(
        pa.Table.from_pydict(
            {
                "item_id": d["item_id"],
                "valid_from": d["valid_from"],
                "release_year": [_none_if_empty(y) for y in d.get("release_year", none)],
                "genres": genres,
            },
            schema=ITEM_SCHEMA,
        ),
        "item_id",
    )


def load_side_tables(
    dataset: str, users: str | None = None, items: str | None = None
) -> tuple[pa.Table | None, pa.Table | None]:
    """The (users, items) side tables of a dataset: explicit CSV paths win, else ML-100K's own, else None."""

    u = read_users_csv(users) if users else (movielens_100k_users() if dataset == MOVIELENS_100K else None)
    i = read_items_csv(items) if items else (movielens_100k_items() if dataset == MOVIELENS_100K else None)
    return u, i


def publish_side_tables(
    feast_cfg,
    dataset: str,
    users: str | None = None,
    items: str | None = None,
    end_ms: int | None = None,
    run_id: str = "side",
) -> dict[str, int]:
    """Write the side tables as the Parquet batch sources of ``user_profile``/``item_catalog`` and materialise them.

    Feast's own ``materialize`` (first time) / ``materialize_incremental`` (later) copies the versions valid at
    ``end_ms`` (default: now) to the online store. Returns the rows written per view.
    """

    u, i = load_side_tables(dataset, users, items)
    apply_repo(feast_cfg)
    store = open_store(feast_cfg)
    written = {}
    for view, table in ((USER_PROFILE_VIEW, u), (ITEM_CATALOG_VIEW, i)):
        if table is not None:
            write_batch_source(store, view, to_batch_source(table), run_id)
            written[view] = table.num_rows
    materialize_batch_views(store, end_ms, views=tuple(written))
    return written
