"""Exactly-once bookkeeping of the feature job: run plans, state snapshots keyed by offsets.

The consumer group's committed offsets are the single source of truth for
"what has been processed". Everything else is keyed so a re-run is idempotent:

- a :class:`Plan` is the micro-batch ``[start, stop)`` per partition; its ``run_id``
  names every file the run writes (training examples, offline features), so
  writing the same run twice overwrites the same files;
- the plan is saved (``pending/<start key>.json``) *before* the run: a re-run
  after a crash finds it and processes exactly the same offsets again, even if
  more events arrived meanwhile;
- the :class:`~pipelines.aggregates.FeatureState` after a run is saved under the
  key of the offsets it corresponds to (``state/<stop key>/``), before the
  offsets are committed. The next run loads the state of the committed
  offsets, so a crash anywhere before the commit recomputes the same values.

Storage is any ``pyarrow.fs`` URI (a local path by default); state is Parquet
and JSON, never pickle.

>>> p = Plan("t", {0: 0, 1: 5}, {0: 3, 1: 5}, planned_at_ms=1)
>>> p.events, [(r.partition, r.start, r.stop) for r in p.ranges()]
(3, [(0, 0, 3)])
>>> Plan.from_json(p.to_json()) == p
True
>>> offsets_key("t", {}) == offsets_key("t", {})
True
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.aggregates import FeatureState
from pipelines.join import JoinState
from pipelines.storage import open_filesystem, write_bytes_atomic, write_parquet_atomic


def offsets_key(topic: str, offsets: dict[int, int]) -> str:
    """A file-name-safe key of a set of committed offsets: ``<total offset>-<hash>`` (sortable by progress)."""
    canon = json.dumps(
        {"topic": topic, "offsets": {str(p): int(o) for p, o in sorted(offsets.items())}}, sort_keys=True
    )
    return f"{sum(offsets.values()):015d}-{hashlib.sha1(canon.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class PartitionRange:
    """Offsets ``[start, stop)`` of one partition of ``topic`` (here, not in the Beam source that reads it: the
    plans and the state store are read without Beam, by the run loop and the CLI)."""

    topic: str
    partition: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return max(0, self.stop - self.start)


@dataclass(frozen=True)
class Plan:
    """One micro-batch: offsets ``[start[p], stop[p])`` of every partition ``p`` of ``topic``.

    ``start`` holds the committed offsets (partitions never committed start at their beginning offset);
    ``committed`` the partitions that had a commit, which is what the state key is computed over.
    """

    topic: str
    start: dict[int, int]
    stop: dict[int, int]
    planned_at_ms: int
    committed: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [p for p in self.start if self.stop.get(p, -1) < self.start[p]]
        if bad or set(self.start) != set(self.stop):
            raise ValueError(
                f"plan for {self.topic}: stop must cover start per partition, got {self.start} -> {self.stop}"
            )

    @property
    def events(self) -> int:
        return sum(self.stop[p] - self.start[p] for p in self.start)

    def ranges(self) -> list[PartitionRange]:
        return [
            PartitionRange(self.topic, p, self.start[p], self.stop[p])
            for p in sorted(self.start)
            if self.stop[p] > self.start[p]
        ]

    @property
    def start_key(self) -> str:
        return offsets_key(self.topic, self.committed)

    @property
    def committed_after(self) -> dict[int, int]:
        """The committed offsets once this run is committed (partitions with new events are committed)."""
        return {**self.committed, **{p: self.stop[p] for p in self.start if self.stop[p] > self.start[p]}}

    @property
    def stop_key(self) -> str:
        return offsets_key(self.topic, self.committed_after)

    @property
    def run_id(self) -> str:
        """Names every output of this run: ``<events before it>-<hash of start and planned stop>``.

        Unique per run (two runs may plan the same stop offsets when the first deferred events) and
        sorting in processing order.
        """
        canon = json.dumps(
            {
                "topic": self.topic,
                "start": {str(p): o for p, o in sorted(self.start.items())},
                "stop": {str(p): o for p, o in sorted(self.stop.items())},
            },
            sort_keys=True,
        )
        return f"{sum(self.start.values()):015d}-{hashlib.sha1(canon.encode()).hexdigest()[:12]}"

    def with_stops(self, stop: dict[int, int]) -> Plan:
        """The same run, committing ``stop`` instead (events after a partition's time-aligned cut are deferred)."""
        return Plan(
            self.topic,
            self.start,
            {p: stop.get(p, self.stop[p]) for p in self.start},
            self.planned_at_ms,
            self.committed,
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "topic": self.topic,
                "start": self.start,
                "stop": self.stop,
                "planned_at_ms": self.planned_at_ms,
                "committed": self.committed,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        ints = lambda m: {int(k): int(v) for k, v in m.items()}  # noqa: E731
        return cls(d["topic"], ints(d["start"]), ints(d["stop"]), int(d["planned_at_ms"]), ints(d["committed"]))


class StateStore:
    """Feature-state snapshots and pending plans under one URI (``<root>/state``, ``<root>/pending``)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root, _ = open_filesystem(uri)

    def _state_dir(self, key: str) -> str:
        return f"{self.root}/state/{key}"

    def save_state(self, key: str, state: FeatureState) -> None:
        d = self._state_dir(key)
        for name, table in state.to_arrow().items():
            write_parquet_atomic(self.fs, f"{d}/{name}.parquet", table, durable=False)
        write_bytes_atomic(self.fs, f"{d}/_SUCCESS", b"", durable=False)  # written last: the snapshot is complete

    def load_state(self, key: str) -> FeatureState | None:
        d = self._state_dir(key)
        if self.fs.get_file_info(f"{d}/_SUCCESS").type == pafs.FileType.NotFound:
            return None
        tables = {}
        for name in ("tail", "evicted"):
            with self.fs.open_input_file(f"{d}/{name}.parquet") as f:
                tables[name] = pq.read_table(f)
        return FeatureState.from_arrow(tables)

    def save_join_state(self, key: str, state) -> None:
        """A :class:`~pipelines.join.JoinState` (contract v2) under the key of its offsets, like
        :meth:`save_state`: Arrow tables as Parquet, ``_SUCCESS`` last."""
        d = self._state_dir(key)
        for name, table in state.to_arrow().items():
            write_parquet_atomic(self.fs, f"{d}/join_{name}.parquet", table)
        write_bytes_atomic(self.fs, f"{d}/_SUCCESS", b"")

    def load_join_state(self, key: str) -> JoinState | None:
        d = self._state_dir(key)
        if self.fs.get_file_info(f"{d}/_SUCCESS").type == pafs.FileType.NotFound:
            return None
        tables = {}
        sel = pafs.FileSelector(d)
        for info in self.fs.get_file_info(sel):
            name = posixpath.basename(info.path)
            if name.startswith("join_") and name.endswith(".parquet"):
                with self.fs.open_input_file(info.path) as f:
                    tables[name[5:-8]] = pq.read_table(f)
        return JoinState.from_arrow(tables)

    def state_keys(self) -> list[str]:
        sel = pafs.FileSelector(f"{self.root}/state", allow_not_found=True)
        return sorted(
            posixpath.basename(i.path) for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory
        )

    def prune_states(self, keep: set[str]) -> None:
        """Delete snapshots other than ``keep`` (after a commit only the committed one is needed)."""
        for key in self.state_keys():
            if key not in keep:
                self.fs.delete_dir(self._state_dir(key))

    def save_pending(self, plan: Plan) -> None:
        write_bytes_atomic(
            self.fs, f"{self.root}/pending/{plan.start_key}.json", plan.to_json().encode(), durable=False
        )

    def load_pending(self, start_key: str) -> Plan | None:
        path = f"{self.root}/pending/{start_key}.json"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return Plan.from_json(f.read().decode())

    def clear_pending(self) -> None:
        self.fs.delete_dir_contents(f"{self.root}/pending", missing_dir_ok=True)
        self.fs.delete_dir_contents(f"{self.root}/results", missing_dir_ok=True)

    def save_result(self, run_id: str, stops: dict[int, int]) -> None:
        """The offsets a run actually completed (its time-aligned cut), for the driver to commit."""
        write_bytes_atomic(
            self.fs,
            f"{self.root}/results/{run_id}.json",
            json.dumps({str(p): int(o) for p, o in stops.items()}).encode(),
            durable=False,
        )

    def load_result(self, run_id: str) -> dict[int, int] | None:
        path = f"{self.root}/results/{run_id}.json"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return {int(p): int(o) for p, o in json.loads(f.read().decode()).items()}
