"""The labelled Beam transforms of the feature job; every element is an Arrow table (a batch of events).

- :class:`ParseRecords`: raw Kafka records -> events, plus rejections (tag ``dlq``);
- :class:`WriteDeadLetters`: rejections -> the dead-letter topic (see below);
- :class:`ComputeFeatures`: events of one micro-batch + the saved state -> training examples (tag
  ``examples``) and per-entity feature snapshots (tag ``snapshots``), saving the advanced state;
- :class:`WriteExamples`: examples -> partitioned Parquet (``dt=YYYY-MM-DD/part-<run id>.parquet``);
- :class:`WriteFeatures`: snapshots -> Feast online (upsert) and offline (``part-<run id>.parquet``).

Dead-letter records keep the original key and value bytes unchanged; the
reason and the origin travel in Kafka headers: ``reloop.reason`` (UTF-8 text),
``reloop.source`` (``topic/partition/offset``) and ``reloop.job``. DLQ
delivery is at-least-once: a re-run after a crash may publish a record again,
with the same ``reloop.source`` header, by which consumers deduplicate.

Counters (namespace ``feature_job``): ``records_read``, ``events_parsed``,
``rejected`` (parse failures read), ``dead_lettered`` and ``dlq_<reason kind>``
(published to the DLQ), ``accepted``, ``late``, ``duplicates``, ``ahead`` (far-future, dead-lettered),
``quarantined`` (records isolated by bisecting a failing batch), ``deferred``
(after the partition-alignment cut, re-read next run), ``examples_written``,
``feature_rows_written``.
"""

import datetime as _dt
import json
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from pipelines import arrow_coder  # noqa: F401  (registers the pa.Table coder)
from pipelines.aggregates import AggregateConfig, FeatureState, compute_features, screen_ahead, snapshot
from pipelines.checkpoint import StateStore
from pipelines.config import FeastConfig, KafkaConfig
from pipelines.feast_io import ITEM_VIEW, USER_VIEW, open_store, write_snapshot  # feast itself loads in open_store
from pipelines.kafka_io import end_offsets, producer
from pipelines.parse import CORE_SCHEMA, REJECT_SCHEMA, concat_events, parse_batch, reason_kind
from pipelines.storage import open_filesystem, write_parquet_atomic

NS = "feature_job"
S = TypeVar("S")  # a state type: FeatureState, JoinState
DAY_MS = 86_400_000


class PartitionParseFn(beam.DoFn):
    """The loop every parse step shares: a raw record table, one partition at a time, through
    :meth:`parse_partition` -> the parsed rows (main), side outputs by tag, rejections (tag ``dlq``).

    Counts the main rows under ``PARSED`` and the rejections under ``rejected`` (namespace ``feature_job``).
    """

    PARSED = "events_parsed"

    def __init__(self, now_ms: int | None = None) -> None:
        self.now_ms = now_ms  # fixed per run, so a re-run judges "far future" identically
        self.parsed = Metrics.counter(NS, self.PARSED)
        self.rejected = Metrics.counter(NS, "rejected")

    def parse_partition(self, part: pa.Table, partition: int) -> tuple[pa.Table, list[tuple[str, pa.Table]], pa.Table]:
        raise NotImplementedError

    def process(self, raw: pa.Table) -> Iterator:
        present = np.unique(raw["kafka_partition"].to_numpy())
        # a reader batch is one partition; stay correct if a caller mixes them
        for p in present:
            part = raw if len(present) == 1 else raw.filter(pc.equal(raw["kafka_partition"], int(p)))
            rows, side, bad = self.parse_partition(part, int(p))
            self.parsed.inc(rows.num_rows)
            if rows.num_rows:
                yield rows
            for tag, t in side:
                if t.num_rows:
                    yield TaggedOutput(tag, t)
            if bad.num_rows:
                self.rejected.inc(bad.num_rows)
                yield TaggedOutput("dlq", bad)


class ParseBatchFn(PartitionParseFn):
    """Raw record table -> event table (main) and rejection table (tag ``dlq``)."""

    def parse_partition(self, part: pa.Table, partition: int) -> tuple[pa.Table, list[tuple[str, pa.Table]], pa.Table]:
        events, bad = parse_quarantined(part, partition, self.now_ms)
        return events, [], bad


def parse_quarantined(part: pa.Table, partition: int, now_ms: int | None) -> tuple[pa.Table, pa.Table]:
    """:func:`parse_batch` of one partition's raw records that cannot fail the run.

    The parser already turns every bad record into a rejection; this is the guard behind it. If the batch
    still raises, or yields a table Arrow does not validate (``validate(full=True)``: e.g. a string that is
    not UTF-8, which would fail every later step), it is bisected until the culprit records stand alone,
    and those are dead-lettered with the error as the reason while the rest proceeds. A failure is
    re-raised only when it cannot be the records' fault (an empty batch failing).
    """
    try:
        events, bad = parse_batch(
            part["value"].combine_chunks(),
            partition=partition,
            offsets=part["kafka_offset"].to_numpy(),
            keys=part["key"].combine_chunks(),
            now_ms=now_ms,
        )
        events.validate(full=True)
        bad.validate(full=True)
        return events, bad
    except Exception as e:  # noqa: BLE001  (quarantine below; one record must not fail the micro-batch)
        if part.num_rows == 0:
            raise
        if part.num_rows == 1:
            Metrics.counter(NS, "quarantined").inc()
            reason = f"parser error: {type(e).__name__}: {str(e)[:200]}"
            return CORE_SCHEMA.empty_table(), pa.table(
                {
                    "kafka_partition": pa.array([partition], pa.int32()),
                    "kafka_offset": part["kafka_offset"],
                    "reason": pa.array([reason]),
                    "key": part["key"],
                    "value": pa.array([part["value"][0].as_py() or b""], pa.binary()),
                },
                schema=REJECT_SCHEMA,
            )
        half = part.num_rows // 2
        left = parse_quarantined(part.slice(0, half), partition, now_ms)
        right = parse_quarantined(part.slice(half), partition, now_ms)
        return concat_events([left[0], right[0]]), pa.concat_tables([left[1], right[1]])


class ParseRecords(beam.PTransform):
    """``PCollection[pa.Table]`` of raw records -> ``{'events': ..., 'dlq': ...}``."""

    def __init__(self, now_ms: int | None = None) -> None:
        super().__init__()
        self.now_ms = now_ms

    def expand(self, raw):
        return raw | "ParseBatches" >> beam.ParDo(ParseBatchFn(self.now_ms)).with_outputs("dlq", main="events")


class DeadLetterFn(beam.DoFn):
    """Publish rejections to the DLQ topic: original key/value bytes, reason and origin in headers."""

    def __init__(self, kafka: KafkaConfig, source_topic: str, dlq_topic: str, job: str = "pipelines.feature_job"):
        self.kafka, self.source_topic, self.dlq_topic, self.job = kafka, source_topic, dlq_topic, job
        self.published = Metrics.counter(NS, "dead_lettered")
        self._producer = None

    def setup(self) -> None:
        self._producer = producer(self.kafka)

    def process(self, bad: pa.Table, stops: dict[int, int] | None = None) -> None:
        if stops is not None:  # records after a partition's cut are deferred to the next run, with their events
            keep = [
                off < stops.get(p, off + 1)
                for p, off in zip(bad["kafka_partition"].to_pylist(), bad["kafka_offset"].to_pylist())
            ]
            bad = bad.filter(pa.array(keep, pa.bool_()))
        self.published.inc(bad.num_rows)
        if bad.num_rows:
            for kind, n in zip(*np.unique([reason_kind(r) for r in bad["reason"].to_pylist()], return_counts=True)):
                Metrics.counter(NS, f"dlq_{kind}").inc(int(n))
        futures = []
        d = bad.to_pydict()
        for p, off, reason, key, value in zip(
            d["kafka_partition"], d["kafka_offset"], d["reason"], d["key"], d["value"]
        ):
            headers = [
                ("reloop.reason", reason.encode("utf-8", "replace")),
                ("reloop.source", f"{self.source_topic}/{p}/{off}".encode()),
                ("reloop.job", self.job.encode()),
            ]
            futures.append(self._producer.send(self.dlq_topic, key=key, value=value, headers=headers))
        self._producer.flush()
        for f in futures:  # raise (and fail the run, so offsets are not committed) if any was not delivered
            f.get(timeout=30)

    def teardown(self) -> None:
        if self._producer is not None:
            self._producer.close()


class WriteDeadLetters(beam.PTransform):
    """Rejections -> the DLQ topic; with ``stops`` (a singleton PCollection), only those before the cut."""

    def __init__(self, kafka: KafkaConfig, source_topic: str, dlq_topic: str, stops=None) -> None:
        super().__init__()
        self.kafka, self.source_topic, self.dlq_topic, self.stops = kafka, source_topic, dlq_topic, stops

    def expand(self, bad):
        fn = DeadLetterFn(self.kafka, self.source_topic, self.dlq_topic)
        if self.stops is None:
            return bad | "PublishDLQ" >> beam.ParDo(fn)
        return bad | "PublishDLQ" >> beam.ParDo(fn, stops=beam.pvalue.AsSingleton(self.stops))


@dataclass(frozen=True)
class BatchResult:
    examples: pa.Table
    users: pa.Table
    items: pa.Table
    state: FeatureState
    stats: dict[str, int]
    #: ``(reason kind, rows)`` of the events dropped as late or duplicate (for the DLQ)
    dropped: tuple[tuple[str, pa.Table], ...] = ()


def compute_batch(events: pa.Table, state: FeatureState, cfg: AggregateConfig) -> BatchResult:
    """Pure core of :class:`ComputeFeatures`: order the batch, compute features, snapshot touched entities.

    Ties in event time are ordered by (partition, offset) so the result does not depend on the order in
    which the runner delivered the batches. Snapshots are as of just after the newest accepted event.
    """
    if events.num_rows:
        events = events.sort_by([("ts", "ascending"), ("kafka_partition", "ascending"), ("kafka_offset", "ascending")])
    dropped: list[tuple[str, pa.Table]] = []
    feats, new_state, stats = compute_features(events, state, cfg, dropped=dropped)
    users = pc.unique(feats["user_id"]).to_pylist() if feats.num_rows else []
    items = pc.unique(feats["item_id"]).to_pylist() if feats.num_rows else []
    u, i = snapshot(new_state, new_state.watermark + 1, cfg, users=sorted(users), items=sorted(items))
    return BatchResult(feats, u, i, new_state, stats, tuple(dropped))


def dead_letter_rows(rows: pa.Table, reason: str) -> pa.Table:
    """Accepted-then-dropped events as DLQ rows: the event re-encoded as contract JSON (its original bytes
    are not kept past parsing), the user id as key, ``reason`` for every row."""
    core = {"event_id", "ts", "user_id", "item_id", "label", "kafka_partition", "kafka_offset"}
    ctx_names = [n for n in rows.column_names if n not in core]
    d = rows.to_pydict()
    values = []
    for i in range(rows.num_rows):
        ev = {k: d[k][i] for k in ("event_id", "ts", "user_id", "item_id", "label")}
        ctx = {k: d[k][i] for k in ctx_names if d[k][i] is not None}
        if ctx:
            ev["context"] = ctx
        values.append(json.dumps(ev, separators=(",", ":"), default=str).encode())
    return pa.table(
        {
            "kafka_partition": rows["kafka_partition"].cast(pa.int32()),
            "kafka_offset": rows["kafka_offset"].cast(pa.int64()),
            "reason": pa.array([reason] * rows.num_rows, pa.string()),
            "key": pa.array([u.encode() for u in d["user_id"]], pa.binary()),
            "value": pa.array(values, pa.binary()),
        },
        schema=REJECT_SCHEMA,
    )


def align_partitions(
    events: pa.Table,
    stops: dict[int, int],
    idle: frozenset[int] | set[int] = frozenset(),
    lagging: Mapping[int, int] | None = None,
) -> tuple[pa.Table, dict[int, int]]:
    """Keep the events of a micro-batch that every partition has caught up with in event time.

    The cut is the smallest, over partitions with events in the batch, of their newest event time. Each
    partition keeps its events up to (not including) its first event later than the cut; that event and
    everything after it in the partition are deferred to the next run (the returned stop offset of the
    partition is the deferred event's offset; ``stops`` elsewhere). Without this, a partition read further
    ahead in event time (a capped batch, a replay racing the job) would make the others' next events late.
    The partition defining the cut is always complete, so every run makes progress. ``idle`` partitions
    (nothing arrived beyond what this run reads, see :class:`ComputeFeaturesFn`) do not set the cut: a
    drained topic is processed in one run. ``lagging`` partitions (see :func:`lagging_partitions`) cap the
    cut at the newest event time read from them: their unread records may be older than the rest.

    >>> ev = pa.table({"ts": [1, 5, 9, 2, 3], "kafka_partition": pa.array([0, 0, 0, 1, 1], pa.int32()),
    ...                "kafka_offset": [0, 1, 2, 0, 1]})
    >>> kept, stop = align_partitions(ev, {0: 3, 1: 4})
    >>> kept["ts"].to_pylist(), stop
    ([1, 2, 3], {0: 1, 1: 4})
    >>> align_partitions(ev, {0: 3, 1: 4}, idle={1})[1]
    {0: 3, 1: 4}
    >>> align_partitions(ev, {0: 3, 1: 4, 2: 0}, lagging={2: 1})[1]  # 2 was empty when planned, not now
    {0: 1, 1: 0, 2: 0}
    """
    if events.num_rows == 0:
        return events, dict(stops)
    parts = events["kafka_partition"].to_numpy()
    ts = events["ts"].to_numpy()
    offsets = events["kafka_offset"].to_numpy()
    present = np.unique(parts)
    busy = [p for p in present if int(p) not in idle]
    caps = list((lagging or {}).values())
    if not busy and not caps:
        return events, dict(stops)
    cut = min([*(ts[parts == p].max() for p in busy), *caps])
    keep = np.ones(len(ts), bool)
    out = dict(stops)
    for p in present:
        idx = np.flatnonzero(parts == p)
        idx = idx[np.argsort(offsets[idx], kind="stable")]
        late = np.flatnonzero(ts[idx] > cut)
        if len(late):
            first = late[0]
            keep[idx[first:]] = False
            out[int(p)] = int(offsets[idx[first]])
    return (events if keep.all() else events.filter(pa.array(keep))), out


def before_cut(t: pa.Table, stops: dict[int, int]) -> pa.Table:
    """The rows of ``t`` before the run's cut: offset below its partition's stop (a partition without a
    stop keeps all its rows). A re-run applies its saved cut with this, so it emits the same rows.

    >>> t = pa.table({"kafka_partition": pa.array([0, 0, 1], pa.int32()), "kafka_offset": [4, 5, 9]})
    >>> before_cut(t, {0: 5})["kafka_offset"].to_pylist()
    [4, 9]
    """
    if t.num_rows == 0:
        return t
    keep = [o < stops.get(p, o + 1) for p, o in zip(t["kafka_partition"].to_pylist(), t["kafka_offset"].to_pylist())]
    return t.filter(pa.array(keep, pa.bool_()))


def start_state(load: Callable[[str], S | None], plan, state_uri: str, what: str, empty: Callable[[], S]) -> S:
    """The state a run starts from: ``load(plan.start_key)``, empty on the very first run, an error when
    the group has committed offsets but their state is gone (``what`` names it: ``feature``, ``join``)."""
    state = load(plan.start_key)
    if state is None:
        if plan.committed:
            raise RuntimeError(
                f"no {what} state for the committed offsets (key {plan.start_key}) under "
                f"{state_uri}; reset the job (reloop features --reset) to recompute"
            )
        state = empty()
    return state


def lagging_partitions(plan, idle: set[int], newest_ts: Mapping[int, int] | None = None) -> dict[int, int]:
    """Partitions the plan read nothing from although records arrived in them since it was made (not
    ``idle``), mapped to the newest event time already read from each (``newest_ts``; -1 if unknown).

    A producer that starts a partition late (a second replay worker, a client coming up) would otherwise
    see its first records arrive behind a cut the run moved past them: dropped as late by the features,
    or behind the join's watermark. Capping the cut defers the rest of the run to the next plan instead,
    which reads the lagging partition.

    >>> from pipelines.checkpoint import Plan
    >>> lagging_partitions(Plan("t", {0: 0, 1: 0}, {0: 5, 1: 0}, 0), idle=set())
    {1: -1}
    """
    known = newest_ts or {}
    return {p: known.get(p, -1) for p in plan.stop if plan.stop[p] <= plan.start[p] and p not in idle}


def idle_partitions(kafka: KafkaConfig | None, stops: dict[int, int], topics: Sequence[tuple[int, str]]) -> set[int]:
    """Partitions whose log end has not moved past the plan's ``stops`` while the run read them (Flink calls
    such a source idle). ``topics`` pairs a base with a topic: plan partition ``base + p`` is partition ``p``
    of that topic (one topic: ``[(0, topic)]``). Without a Kafka config (unit tests) none is idle: the
    strict cut."""
    if kafka is None:
        return set()
    bases = sorted(base for base, _ in topics)
    idle = set()
    for base, topic in topics:
        end = end_offsets(kafka, topic)
        for p, stop in stops.items():
            if max(b for b in bases if b <= p) == base and end.get(p - base, stop) <= stop:
                idle.add(p)
    return idle


class ComputeFeaturesFn(beam.DoFn):
    """All event batches of the micro-batch (one key) -> examples + snapshots; saves the new state.

    Also emits (tag ``stops``) the offsets the run completes after :func:`align_partitions`, saves them as
    the run's result for the driver to commit, and saves the state under the key of those offsets.
    """

    def __init__(self, state_uri: str, plan, cfg: AggregateConfig, kafka: KafkaConfig | None = None):
        self.state_uri, self.plan, self.cfg, self.kafka = state_uri, plan, cfg, kafka
        self.counters = {k: Metrics.counter(NS, k) for k in ("accepted", "late", "duplicates", "deferred", "ahead")}

    def process(self, keyed: tuple[int, Iterable[pa.Table]]) -> Iterator:
        plan = self.plan
        store = StateStore(self.state_uri)
        state = start_state(store.load_state, plan, self.state_uri, "feature", FeatureState.empty)
        events = concat_events(list(keyed[1]))
        # before the cut: a far-future record must not set it (it would defer its partition forever)
        events, ahead = screen_ahead(events, state, self.cfg)
        prior = store.load_result(plan.run_id)
        if prior is not None:  # a re-run of an interrupted run: the same cut, so the same outputs
            kept = before_cut(events, prior)
            stops = {**plan.stop, **prior}
        else:
            idle = idle_partitions(self.kafka, plan.stop, [(0, plan.topic)])
            kept, stops = align_partitions(events, plan.stop, idle, lagging_partitions(plan, idle))
        res = compute_batch(kept, state, self.cfg)
        store.save_state(plan.with_stops(stops).stop_key, res.state)
        store.save_result(plan.run_id, stops)
        for k in ("accepted", "late", "duplicates"):
            self.counters[k].inc(res.stats[k])
        self.counters["deferred"].inc(events.num_rows - kept.num_rows)
        yield TaggedOutput("stops", stops)  # after save_result: any sink output implies the cut is on disk
        dlq = [dead_letter_rows(rows, f"{kind}: {_DROP_REASONS[kind]}") for kind, rows in res.dropped]
        if ahead.num_rows:  # those after the cut are re-read (and re-judged) by the next run
            ahead = before_cut(ahead, stops)
            self.counters["ahead"].inc(ahead.num_rows)
            if ahead.num_rows:
                dlq.append(dead_letter_rows(ahead, f"ahead: {_DROP_REASONS['ahead']} ({self.cfg.max_ahead_ms} ms)"))
        if dlq:
            yield TaggedOutput("dlq", pa.concat_tables(dlq))
        yield TaggedOutput("examples", res.examples)
        yield TaggedOutput("snapshots", ("user", res.users))
        yield TaggedOutput("snapshots", ("item", res.items))


_DROP_REASONS = {
    "late": "older than the watermark minus the allowed lateness",
    "duplicate": "event_id already seen (the first copy in the log wins)",
    "ahead": "too far ahead of the partition's recent event times",
}


class ComputeFeatures(beam.PTransform):
    """``PCollection[pa.Table]`` of events -> ``{'examples', 'snapshots': (entity, pa.Table), 'stops'}``.

    The micro-batch is aggregated as one unit (a single key): the features of an event depend on every
    earlier event of its user and of its item, across partitions.
    """

    def __init__(
        self, state_uri: str, plan, cfg: AggregateConfig = AggregateConfig(), kafka: KafkaConfig | None = None
    ) -> None:
        super().__init__()
        self.args = (state_uri, plan, cfg, kafka)

    def expand(self, events):
        # one empty batch always joins: a micro-batch of only rejected records still aggregates (nothing),
        # saves its result and stops, and so commits past them (else the DLQ's side input is empty and
        # the run fails again and again on the same plan)
        seed = events.pipeline | "SeedEmptyBatch" >> beam.Create([CORE_SCHEMA.empty_table()])
        out = (
            (events, seed)
            | "WithSeed" >> beam.Flatten()
            | "KeyAll" >> beam.Map(lambda t: (0, t)).with_output_types(tuple[int, pa.Table])
            | "GatherMicroBatch" >> beam.GroupByKey()
            | "Aggregate"
            >> beam.ParDo(ComputeFeaturesFn(*self.args)).with_outputs("examples", "snapshots", "stops", "dlq")
        )
        state_uri, plan, cfg, kafka = self.args
        if kafka is not None:  # late, duplicate and far-ahead events: a side output, never only a counter
            _ = out.dlq | "DeadLetterDropped" >> WriteDeadLetters(kafka, plan.topic, kafka.dlq_topic)
        return out


def example_partitions(examples: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """``(dt=YYYY-MM-DD, rows)`` of a time-sorted example table, by the UTC date of the event.

    >>> t = pa.table({"ts": [0, 1, 86_400_000]})
    >>> [(d, r.num_rows) for d, r in example_partitions(t)]
    [('dt=1970-01-01', 2), ('dt=1970-01-02', 1)]
    """
    days = examples["ts"].to_numpy() // DAY_MS
    for day in np.unique(days):
        date = _dt.date(1970, 1, 1) + _dt.timedelta(days=int(day))
        yield f"dt={date.isoformat()}", examples.filter(pa.array(days == day))


class WriteExamplesFn(beam.DoFn):
    """Writes each day of examples as one Parquet file, on a small thread pool.

    Parquet encoding and file I/O release the GIL, so the files are written while the Feast write of
    the same bundle runs in Python; ``finish_bundle`` waits for every file (and raises the first error),
    so the bundle, and with it the offsets commit after the pipeline, never completes before the files
    are in place.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.written = Metrics.counter(NS, "examples_written")

    def setup(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="examples")

    def start_bundle(self) -> None:
        self._pending: list = []
        self._rows = 0

    def process(self, examples: pa.Table) -> None:
        fs, root, _ = open_filesystem(self.uri)
        fault = os.environ.get("RELOOP_FAULT") == "mid_sinks"

        def write(path: str, rows: pa.Table, first: bool) -> None:
            write_parquet_atomic(fs, path, rows, durable=False)
            if first and fault:  # crash-test hook: some files written, not all
                os.kill(os.getpid(), signal.SIGKILL)

        for i, (part, rows) in enumerate(example_partitions(examples)):
            path = f"{root}/{part}/part-{self.run_id}.parquet"
            self._pending.append(self._pool.submit(write, path, rows, i == 0 and not self._pending))
        self._rows += examples.num_rows

    def finish_bundle(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        self.written.inc(self._rows)

    def teardown(self) -> None:
        self._pool.shutdown(wait=True)


class WriteExamples(beam.PTransform):
    """Training examples -> ``<uri>/dt=YYYY-MM-DD/part-<run id>.parquet`` (overwritten by a re-run)."""

    def __init__(self, uri: str, run_id: str) -> None:
        super().__init__()
        self.uri, self.run_id = uri, run_id

    def expand(self, examples):
        return examples | "WriteParquet" >> beam.ParDo(WriteExamplesFn(self.uri, self.run_id))


class WriteFeaturesFn(beam.DoFn):
    def __init__(self, feast: FeastConfig, repo_path: str | None, run_id: str) -> None:
        self.feast, self.repo_path, self.run_id = feast, repo_path, run_id
        self.rows = Metrics.counter(NS, "feature_rows_written")
        self._store = None

    def setup(self) -> None:
        self._store = open_store(self.feast, self.repo_path)

    def process(self, element: tuple[str, pa.Table]) -> None:
        entity, table = element
        write_snapshot(self._store, USER_VIEW if entity == "user" else ITEM_VIEW, table, self.run_id)
        self.rows.inc(table.num_rows)


class WriteFeatures(beam.PTransform):
    """Snapshots -> Feast (online upsert + offline Parquet per run)."""

    def __init__(self, feast: FeastConfig, repo_path: str | None, run_id: str) -> None:
        super().__init__()
        self.args = (feast, repo_path, run_id)

    def expand(self, snapshots):
        return snapshots | "WriteFeast" >> beam.ParDo(WriteFeaturesFn(*self.args))
