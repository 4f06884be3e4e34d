"""Read the training-example store (Parquet files under ``storage.examples_uri``) by position.

The feature job writes each micro-batch of training examples as new Parquet
files that never change once visible (written under a temporary name and
renamed, or written whole to an object store); files and directories whose
name starts with ``.`` or ``_`` are in progress or metadata and are ignored.

A reader's **position** is the set of files it has consumed fully plus, at
most, one file it is part-way through (``partial``: path and rows done). It
is a small JSON-able dict, checkpointed together with a model, so a resumed
trainer continues exactly after the last example its checkpoint learned:
none skipped, none twice. New files are taken in order of their smallest
``ts`` (from the Parquet footer statistics, read once per file), then path.

>>> import tempfile, os, pyarrow as pa, pyarrow.parquet as pq
>>> root = tempfile.mkdtemp()
>>> pq.write_table(pa.table({"event_id": ["b"], "ts": [20]}), os.path.join(root, "part-2.parquet"))
>>> pq.write_table(pa.table({"event_id": ["a", "c"], "ts": [10, 30]}), os.path.join(root, "part-1.parquet"))
>>> store = ExampleStore(root)
>>> pos = Position()
>>> for batch, pos in store.batches(pos, batch_size=1):
...     print(batch.column("event_id").to_pylist(), pos.partial)
['a'] ('part-1.parquet', 1)
['c'] None
['b'] None
>>> pos.done, pos.partial
(['part-1.parquet', 'part-2.parquet'], None)
>>> list(store.batches(pos, batch_size=1))
[]
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.side_features import SideTableSource
from pipelines.storage import open_filesystem, write_parquet_atomic


@dataclass
class Position:
    """Files consumed fully (relative paths) and the file in progress with the rows already consumed."""

    done: list[str] = field(default_factory=list)
    partial: tuple[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"done": list(self.done), "partial": list(self.partial) if self.partial else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Position:
        if not d:
            return cls()
        p = d.get("partial")
        return cls(list(d.get("done", [])), (str(p[0]), int(p[1])) if p else None)

    def advanced(self, path: str, rows_done: int, file_rows: int) -> Position:
        """A new position after consuming rows up to ``rows_done`` of ``path`` (``file_rows`` in all)."""
        if rows_done >= file_rows:
            return Position([*self.done, path], None)
        return Position(list(self.done), (path, rows_done))


class ExampleStore:
    """The Parquet files of training examples under ``uri`` (local path, pyarrow or fsspec URI).

    ``side``: the side tables (user profile, item catalogue) joined point in time onto every table read
    (:mod:`pipelines.side_features`): the trainer, the retrain and the serving loop of ``reloop run`` read
    examples through it, so they all see the attributes Feast's batch views serve.
    """

    def __init__(self, uri: str, columns: list[str] | None = None, side: SideTableSource | None = None) -> None:
        self.uri = uri
        self.fs, self.root, self.local = open_filesystem(uri)
        self.columns = columns
        self.side = side
        self._min_ts: dict[str, int] = {}  # path -> smallest ts, cached: files never change

    def files(self) -> list[str]:
        """All visible example files (relative paths), in consumption order."""
        sel = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
                continue
            rel = self._rel(info.path)
            if any(part.startswith((".", "_")) for part in rel.split("/")):
                continue
            out.append(rel)
        return sorted(out, key=lambda p: (self._file_min_ts(p), p))

    def _rel(self, path: str) -> str:
        root = self.root.rstrip("/").replace(os.sep, "/")
        return path.replace(os.sep, "/")[len(root) :].lstrip("/")

    def _abs(self, rel: str) -> str:
        return posixpath.join(self.root.replace(os.sep, "/"), rel)

    def _file_min_ts(self, rel: str) -> int:
        if rel not in self._min_ts:
            self._min_ts[rel] = _min_ts(pq.ParquetFile(self._abs(rel), filesystem=self.fs).metadata)
        return self._min_ts[rel]

    def read_file(self, rel: str) -> pa.Table:
        return self._joined(pq.read_table(self._abs(rel), filesystem=self.fs, columns=self.columns))

    def _joined(self, table: pa.Table) -> pa.Table:
        return self.side.join(table) if self.side is not None and table.num_rows else table

    def pending(self, pos: Position) -> list[str]:
        """Files not yet consumed fully, the partial one first."""
        done = set(pos.done)
        return [f for f in self.files() if f not in done]

    def batches(self, pos: Position, batch_size: int) -> Iterator[tuple[pa.Table, Position]]:
        """Yield ``(batch, position after it)`` over every example after ``pos`` (in file order)."""
        pending = self.pending(pos)
        if pos.partial and pos.partial[0] in pending:
            pending.remove(pos.partial[0])
            pending.insert(0, pos.partial[0])
        for rel in pending:
            table = self.read_file(rel)
            start = pos.partial[1] if pos.partial and pos.partial[0] == rel else 0
            if start >= table.num_rows:
                pos = pos.advanced(rel, table.num_rows, table.num_rows)
                continue
            for lo in range(start, table.num_rows, batch_size):
                hi = min(lo + batch_size, table.num_rows)
                pos = pos.advanced(rel, hi, table.num_rows)
                yield table.slice(lo, hi - lo), pos

    def read_window(self, ts_min: int | None = None, ts_max: int | None = None) -> pa.Table:
        """Every example with ``ts_min <= ts < ts_max`` (either bound optional), sorted by (ts, event_id)."""
        files = [self._abs(f) for f in self.files()]
        if not files:
            return pa.table({})
        dataset = ds.dataset(files, format="parquet", filesystem=self.fs)
        expr = None
        if ts_min is not None:
            expr = ds.field("ts") >= ts_min
        if ts_max is not None:
            e2 = ds.field("ts") < ts_max
            expr = e2 if expr is None else expr & e2
        table = dataset.to_table(filter=expr, columns=self.columns)
        keys = [(k, "ascending") for k in ("ts", "event_id") if k in table.column_names]
        return self._joined(table.sort_by(keys) if keys else table)


def _min_ts(meta: pq.FileMetaData) -> int:
    """Smallest ``ts`` in a Parquet file from its row-group statistics (0 when absent)."""
    lows = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for j in range(rg.num_columns):
            col = rg.column(j)
            if col.path_in_schema == "ts" and col.statistics is not None and col.statistics.has_min_max:
                lows.append(col.statistics.min)
    return int(min(lows)) if lows else 0


def write_example_files(
    table: pa.Table, root: str, rows_per_file: int, prefix: str = "part", start: int = 0
) -> list[str]:
    """Write ``table`` as immutable example files (temp name + rename), for tests, demos and benchmarks.

    The feature job is the producer in production; this writes the same layout from any table of
    examples (e.g. ``compute_features`` over a dataset). Returns the relative paths written.
    """
    os.makedirs(root, exist_ok=True)
    out = []
    for k, lo in enumerate(range(0, table.num_rows, rows_per_file)):
        name = f"{prefix}-{start + k:06d}.parquet"
        write_parquet_atomic(
            pafs.LocalFileSystem(),
            os.path.join(os.path.abspath(root), name),
            table.slice(lo, rows_per_file),
            durable=False,
        )
        out.append(name)
    return out
