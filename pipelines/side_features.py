"""Side attributes (user profile, item catalogue) joined point in time onto examples: the one join.

The side tables are the Parquet batch sources of Feast's batch views ``user_profile`` and
``item_catalog`` (:mod:`features.feature_repo`): one row per *version* of an entity's attributes
with the time it became valid (``event_timestamp``). ``reloop side-tables`` writes them into the
Feast repo's offline directory; ``reloop run --side-features`` writes them under its state. Either
directory (``<root>/user_profile/*.parquet``, ``<root>/item_catalog/*.parquet``, Feast's own glob)
is what the trainer, the retrain, the serving loop of ``reloop run`` and ``reloop evaluate`` join
from, so a model learns exactly the attributes ``/score`` later reads from Feast.

Point in time (Feast's rule, as in ``get_historical_features`` with TTL 0): an example at ``ts``
sees the newest version with ``valid_from <= ts``; an entity without one, and any missing
attribute, gets the default Feast serves: null for a category (the encoder's bucket 0, "missing")
and the empty list for a bag. An unknown user or item is never an error.

>>> import pyarrow as pa
>>> users = pa.table({"user_id": ["u1", "u1"], "valid_from": [0, 100], "age_bucket": ["18-24", "25-34"]})
>>> ev = pa.table({"user_id": ["u1", "u1", "u3"], "ts": [99, 100, 5]})
>>> join_as_of(ev, users, "user_id", ("age_bucket",)).column("age_bucket").to_pylist()
['18-24', '25-34', None]
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.feast_io import (
    BAG_FEATURES,
    BATCH_FEATURES,
    ITEM_CATALOG_VIEW,
    USER_PROFILE_VIEW,
    offline_dir,
    open_store,
)
from pipelines.storage import open_filesystem, write_parquet_atomic

#: the attributes of the batch views, as Feast declares them (features/feature_repo.py)
USER_ATTRIBUTES: tuple[str, ...] = BATCH_FEATURES[USER_PROFILE_VIEW]
ITEM_ATTRIBUTES: tuple[str, ...] = tuple(f for f in BATCH_FEATURES[ITEM_CATALOG_VIEW] if f not in BAG_FEATURES)
ITEM_BAGS: tuple[str, ...] = tuple(f for f in BATCH_FEATURES[ITEM_CATALOG_VIEW] if f in BAG_FEATURES)
#: what a side-feature model encodes beyond the ids: the categorical fields and the bags
SIDE_CATEGORICAL: tuple[str, ...] = USER_ATTRIBUTES + ITEM_ATTRIBUTES
SIDE_BAGS: tuple[str, ...] = ITEM_BAGS
USER_SCHEMA = pa.schema(
    [("user_id", pa.string()), ("valid_from", pa.int64()), *((c, pa.string()) for c in USER_ATTRIBUTES)]
)
ITEM_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("valid_from", pa.int64()),
        *((c, pa.string()) for c in ITEM_ATTRIBUTES),
        *((c, pa.list_(pa.string())) for c in ITEM_BAGS),
    ]
)
_VIEWS = ((USER_PROFILE_VIEW, "user_id", USER_SCHEMA), (ITEM_CATALOG_VIEW, "item_id", ITEM_SCHEMA))


def sort_versions(table: pa.Table, key: str) -> pa.Table:
    """A side table in (key, valid_from) order: each entity's versions are one run, oldest first."""
    return table.sort_by([(key, "ascending"), ("valid_from", "ascending")])


def join_as_of(events: pa.Table, side: pa.Table, key: str, columns: tuple[str, ...], ts_column: str = "ts") -> pa.Table:
    """``events`` plus ``columns`` of the newest ``side`` version of each row's ``key`` with ``valid_from <= ts``.

    Rows without such a version get nulls. ``events`` keeps its order and its other columns (a column of the
    same name is replaced). Vectorised: one sort of the side versions and the events together.
    """
    side = sort_versions(side, key)
    n, m = side.num_rows, events.num_rows
    skeys = pc.cast(side[key], pa.string())
    uniq = pc.unique(skeys)  # first-occurrence order of a sorted column: entity numbers ascend with the rows
    s_ent = pc.index_in(skeys, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)
    e_ent = pc.index_in(pc.cast(events[key], pa.string()), value_set=uniq).fill_null(-1)
    e_ent = e_ent.to_numpy(zero_copy_only=False).astype(np.int64)
    valid = side["valid_from"].to_numpy(zero_copy_only=False).astype(np.int64)
    ts = events[ts_column].to_numpy(zero_copy_only=False).astype(np.int64)
    # in (entity, time, side-before-event) order, the newest version at or before an event is the last side
    # row ahead of it; side rows come in their own (sorted) order, so a running max finds it
    order = np.lexsort((np.r_[np.zeros(n, np.int8), np.ones(m, np.int8)], np.r_[valid, ts], np.r_[s_ent, e_ent]))
    last = np.maximum.accumulate(np.where(order < n, order, -1)) if n + m else np.zeros(0, np.int64)
    at_event = order >= n
    take = np.full(m, -1, np.int64)
    take[order[at_event] - n] = last[at_event]
    hit = take >= 0
    hit[hit] = s_ent[take[hit]] == e_ent[hit]  # the version found must be the row's own entity's
    take[~hit] = -1
    idx = pa.array(take, mask=~hit)
    out = events
    for c in columns:
        if c in out.column_names:
            out = out.drop_columns([c])
        out = out.append_column(c, side[c].take(idx))
    return out


def to_batch_source(side: pa.Table) -> pa.Table:
    """A side table as the rows of its Feast batch source: ``valid_from`` becomes ``event_timestamp`` (epoch ms)."""
    return side.rename_columns(["event_timestamp" if c == "valid_from" else c for c in side.column_names])


def write_side_tables(root: str, users: pa.Table | None, items: pa.Table | None, run_id: str) -> dict[str, int]:
    """Write side tables as batch sources under ``root`` (``<root>/<view>/part-<run_id>.parquet``, the layout and
    columns Feast's ``user_profile`` / ``item_catalog`` read); the same ``run_id`` overwrites. Rows per view."""
    fs, base, _ = open_filesystem(root)
    out = {}
    for (view, _, _), table in zip(_VIEWS, (users, items)):
        if table is None:
            continue
        rows = to_batch_source(table)
        ts = pc.cast(rows["event_timestamp"], pa.timestamp("ms", tz="UTC"))
        rows = rows.set_column(rows.column_names.index("event_timestamp"), "event_timestamp", ts)
        write_parquet_atomic(fs, posixpath.join(base, view, f"part-{run_id}.parquet"), rows, durable=False)
        out[view] = table.num_rows
    return out


def _files(fs: pafs.FileSystem, base: str, view: str) -> list[pafs.FileInfo]:
    # Feast's glob <root>/<view>/*.parquet; a dot- or underscore-name is a write in progress
    sel = pafs.FileSelector(posixpath.join(base, view), allow_not_found=True)
    return sorted(
        (
            i
            for i in fs.get_file_info(sel)
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and i.base_name[0] not in "._"
        ),
        key=lambda i: i.path,
    )


def _as_side_table(rows: pa.Table, key: str, schema: pa.Schema) -> pa.Table:
    ts = rows["event_timestamp"]
    if pa.types.is_timestamp(ts.type):
        ts = pc.cast(pc.cast(ts, pa.timestamp("ms", tz="UTC")), pa.int64())
    cols = {"valid_from": pc.cast(ts, pa.int64())}
    for f in schema:
        if f.name == "valid_from":
            continue
        cols[f.name] = pc.cast(rows[f.name], f.type) if f.name in rows.column_names else pa.nulls(rows.num_rows, f.type)
    return sort_versions(pa.table({f.name: cols[f.name] for f in schema}, schema=schema), key)


def read_batch_sources(root: str) -> tuple[pa.Table | None, pa.Table | None]:
    """The (users, items) side tables in the batch sources under ``root``; None for a view without files."""
    fs, base, _ = open_filesystem(root)
    out: list[pa.Table | None] = []
    for view, key, schema in _VIEWS:
        files = _files(fs, base, view)
        if not files:
            out.append(None)
            continue
        parts = [_as_side_table(pq.read_table(i.path, filesystem=fs), key, schema) for i in files]
        out.append(sort_versions(pa.concat_tables(parts), key))
    return out[0], out[1]


@dataclass(frozen=True)
class SideTables:
    """The user and item side tables (either may be None: its attributes are then all defaults)."""

    users: pa.Table | None
    items: pa.Table | None

    @classmethod
    def read(cls, root: str) -> SideTables:
        return cls(*read_batch_sources(root))

    def join(self, table: pa.Table, ts_column: str = "ts") -> pa.Table:
        """``table`` plus every side attribute valid at each row's ``ts_column`` (defaults where none is)."""
        out = table
        for side, key, names in (
            (self.users, "user_id", USER_ATTRIBUTES),
            (self.items, "item_id", ITEM_ATTRIBUTES + ITEM_BAGS),
        ):
            if side is not None:
                out = join_as_of(out, side, key, names, ts_column)
            else:
                out = _replace(
                    out,
                    {
                        c: pa.nulls(out.num_rows, pa.list_(pa.string()) if c in ITEM_BAGS else pa.string())
                        for c in names
                    },
                )
        # a bag's default is the empty bag, as Feast serves an item without a catalogue row
        empty = pa.scalar([], pa.list_(pa.string()))
        return _replace(out, {c: pc.if_else(pc.is_null(out[c]), empty, out[c]) for c in ITEM_BAGS})


def _replace(table: pa.Table, cols: dict) -> pa.Table:
    for c, arr in cols.items():
        if c in table.column_names:
            table = table.drop_columns([c])
        table = table.append_column(c, arr)
    return table


class SideTableSource:
    """The side tables under ``root``, read again when its files change (checked every ``refresh_seconds``).

    Long-lived readers (the trainer, the serving loop) hold one: a new version written by ``reloop side-tables``
    reaches them without a restart, and point in time still decides which examples see it.
    """

    def __init__(self, root: str, refresh_seconds: float = 30.0) -> None:
        self.root, self.refresh_seconds = root, refresh_seconds
        self.fs, self.base, _ = open_filesystem(root)
        self._stamp: tuple | None = None
        self._checked = -float("inf")
        self._tables = SideTables(None, None)

    def _listing(self) -> tuple:
        return tuple((i.path, i.size, i.mtime_ns) for view, _, _ in _VIEWS for i in _files(self.fs, self.base, view))

    def tables(self) -> SideTables:
        now = time.monotonic()
        if now - self._checked >= self.refresh_seconds:
            self._checked = now
            stamp = self._listing()
            if stamp != self._stamp:
                self._tables, self._stamp = SideTables.read(self.root), stamp
        return self._tables

    def join(self, table: pa.Table, ts_column: str = "ts") -> pa.Table:
        return self.tables().join(table, ts_column)


def feast_batch_root(feast_cfg) -> str:
    """The directory holding the batch sources of the configured Feast repo's ``user_profile`` / ``item_catalog``
    (where ``reloop side-tables`` writes them): the parent of the views' own source directories."""
    try:
        store = open_store(feast_cfg)
        dirs = {posixpath.dirname(offline_dir(store, v).rstrip("/")) for v, _, _ in _VIEWS}
    except Exception as e:  # Feast raises its own not-found errors: the repo was never applied
        raise ValueError(
            f"side features: the Feast repo has no batch views user_profile/item_catalog ({e}); "
            f"run `reloop side-tables` first, or give the side tables' location"
        ) from e
    if len(dirs) != 1:
        raise ValueError(f"side features: user_profile and item_catalog read from different roots: {sorted(dirs)}")
    return dirs.pop()


def side_source(root: str | None) -> SideTableSource | None:
    """A :class:`SideTableSource` for a configured location, None for none."""
    return SideTableSource(root) if root else None
