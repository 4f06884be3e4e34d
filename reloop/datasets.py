"""Read a real dataset into a time-sorted Arrow table of events.

Every reader returns the same columns, sorted by event time (ties keep file
order): ``event_id`` (string), ``ts`` (int64, epoch ms), ``user_id`` and
``item_id`` (string), ``label`` (int8, 0/1), then any context columns.

- ``movielens-100k``: the ML-100K ratings shipped inside the PyPI wheel
  ``recbole==1.2.1`` (installed with ``--no-deps``; never imported, never
  copied into the repo). Label = rating >= 4.
- a path to a CSV or Parquet file with columns ``user_id,item_id,timestamp,label``
  (timestamp in unix seconds, label 0/1); an ``event_id`` column is used when
  present; every other column becomes a context feature.

Timestamps in whole seconds tie often (half of ML-100K's events share a second
with an earlier event of the same user), and features count only events
*strictly before* an event's time. By default (``spread_ties=True``) the events
of one second are spread 1 ms apart in file order, so "before" means before in
the stream, for the feature job, the live loop and the evaluation alike (a
second with more than 1,000 events gives its later events the 999th ms).

>>> import pyarrow as pa, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "e.csv")
>>> _ = open(p, "w").write("user_id,item_id,timestamp,label,device\\nu2,i1,20,1,web\\nu1,i9,10,0,app\\n")
>>> t = load_dataset(p)
>>> t.column_names
['event_id', 'ts', 'user_id', 'item_id', 'label', 'device']
>>> t.column("ts").to_pylist(), t.column("event_id").to_pylist()
([10000, 20000], ['e-1', 'e-0'])
>>> _ = open(p, "a").write("u3,i1,20,1,web\\n")
>>> load_dataset(p).column("ts").to_pylist(), load_dataset(p, spread_ties=False).column("ts").to_pylist()
([10000, 20000, 20001], [10000, 20000, 20000])
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from online_models.errors import DatasetError
from pipelines.aggregates import FeatureState, compute_features
from pipelines.events import REQUIRED, Event
from reloop.synthetic import load_synthetic

MOVIELENS_100K = "movielens-100k"
BUILTIN = (MOVIELENS_100K,)
REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp", "label")
#: the columns every data set maps onto: the event contract's required fields
CORE_COLUMNS = REQUIRED


def movielens_100k_path() -> Path:
    """Where the installed ``recbole`` wheel keeps ``ml-100k.inter`` (without importing recbole)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            "MovieLens-100K comes from the PyPI wheel recbole==1.2.1, which is not installed; "
            "run `make setup` (or `pip install --no-deps recbole==1.2.1`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise DatasetError(f"recbole is installed but {path} is missing; reinstall recbole==1.2.1")
    return path


def load_movielens_100k(limit: int | None = None, spread_ties: bool = True) -> pa.Table:
    """The 100,000 ML-100K ratings as events, label = rating >= 4."""
    path = movielens_100k_path()
    raw = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter="\t"),
        read_options=pacsv.ReadOptions(skip_rows=1, column_names=["user_id", "item_id", "rating", "timestamp"]),
        convert_options=pacsv.ConvertOptions(
            column_types={
                "user_id": pa.string(),
                "item_id": pa.string(),
                "rating": pa.float64(),
                "timestamp": pa.int64(),
            }
        ),
    )
    label = pc.cast(pc.greater_equal(raw["rating"], 4.0), pa.int8())
    table = pa.table(
        {"user_id": raw["user_id"], "item_id": raw["item_id"], "timestamp": raw["timestamp"], "label": label}
    )
    return _finish(table, prefix="ml100k-", source=str(path), limit=limit, spread_ties=spread_ties)


def load_file(path: str | Path, limit: int | None = None, spread_ties: bool = True) -> pa.Table:
    """Read a CSV or Parquet file of events (see the module docstring for its columns)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (expected CSV or Parquet, or one of {', '.join(BUILTIN)})")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    column_types={"user_id": pa.string(), "item_id": pa.string(), "event_id": pa.string()}
                ),
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"{path}: cannot be read: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; "
            f"required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(table.column_names)}"
        )
    return _finish(table, prefix="e-", source=str(path), limit=limit, spread_ties=spread_ties)


def load_dataset(spec: str, limit: int | None = None, spread_ties: bool = True) -> pa.Table:
    """``movielens-100k`` or a path to a CSV/Parquet file; ``limit`` keeps the first N in time order.

    ``spread_ties``: events of the same second 1 ms apart in file order (see the module docstring);
    synthetic streams have millisecond times already and ignore it.
    """
    if spec == MOVIELENS_100K:
        return load_movielens_100k(limit, spread_ties)
    if spec.startswith("synthetic:"):  # e.g. synthetic:abrupt_ctr?n=100000&seed=1 (see reloop.synthetic)
        return load_synthetic(spec, limit)
    return load_file(spec, limit, spread_ties)


def _finish(table: pa.Table, *, prefix: str, source: str, limit: int | None, spread_ties: bool) -> pa.Table:
    if table.num_rows == 0:
        raise DatasetError(f"{source}: no rows")
    cols: dict[str, pa.Array] = {}
    for name in ("user_id", "item_id"):
        cols[name] = _cast(table[name], pa.string(), source, name)
    ts = _cast(table["timestamp"], pa.int64(), source, "timestamp (unix seconds)")
    if pc.any(pc.is_null(ts)).as_py() or pc.min(ts).as_py() < 0:
        raise DatasetError(f"{source}: column timestamp has null or negative values")
    cols["ts"] = pc.multiply(ts, 1000)
    label = _cast(table["label"], pa.int8(), source, "label (0/1)")
    if not pc.all(pc.is_in(label, pa.array([0, 1], pa.int8()))).as_py():
        raise DatasetError(f"{source}: column label must hold only 0 and 1")
    cols["label"] = label
    if "event_id" in table.column_names:
        cols["event_id"] = _cast(table["event_id"], pa.string(), source, "event_id")
    else:
        cols["event_id"] = pa.array([f"{prefix}{i}" for i in range(table.num_rows)], pa.string())
    context = [c for c in table.column_names if c not in REQUIRED_COLUMNS and c != "event_id"]
    out = pa.table({**{c: cols[c] for c in CORE_COLUMNS}, **{c: table[c] for c in context}})
    # stable sort: ties in event time keep file order, so replays are deterministic
    order = np.argsort(out["ts"].to_numpy(), kind="stable")
    out = out.take(pa.array(order))
    if spread_ties:
        ts = out["ts"].to_numpy()
        rank = np.arange(len(ts)) - np.searchsorted(ts, ts, side="left")  # earlier events of the same second
        out = out.set_column(1, "ts", pa.array(ts + np.minimum(rank, 999), pa.int64()))
    if limit is not None:
        if limit <= 0:
            raise DatasetError(f"limit must be positive, got {limit}")
        out = out.slice(0, limit)
    return out.combine_chunks()


def _cast(col: pa.ChunkedArray, typ: pa.DataType, source: str, name: str) -> pa.ChunkedArray:
    try:
        return pc.cast(col, typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DatasetError(f"{source}: column {name} cannot be read as {typ}: {e}") from e


def iter_events(table: pa.Table, batch_size: int = 10_000):
    """Yield the rows of an event table as :class:`pipelines.events.Event`, in table order."""

    context_cols = [c for c in table.column_names if c not in CORE_COLUMNS]
    for batch in table.to_batches(batch_size):
        d = batch.to_pydict()
        for i in range(batch.num_rows):
            ctx = {c: d[c][i] for c in context_cols}
            yield Event(d["event_id"][i], d["ts"][i], d["user_id"][i], d["item_id"][i], d["label"][i], ctx)


def movielens_examples(limit: int) -> pa.Table:
    """Training examples (events + leak-free features) of the first ``limit`` MovieLens-100K events."""
    feats, _, _ = compute_features(load_dataset("movielens-100k", limit=limit), FeatureState.empty())
    return feats
