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
``dead_lettered`` and ``dlq_<reason kind>``, ``accepted``, ``late``,
``duplicates``, ``examples_written``, ``feature_rows_written``.
"""


from dataclasses import dataclass
from typing import Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from pipelines import arrow_coder  # noqa: F401  (registers the pa.Table coder)
from pipelines.aggregates import AggregateConfig, FeatureState, compute_features, snapshot
from pipelines.parse import concat_events, parse_batch, reason_kind
from reloop.config import FeastConfig, KafkaConfig

NS = "feature_job"
DAY_MS = 86_400_000


class ParseBatchFn(beam.DoFn):
    """Raw record table -> event table (main) and rejection table (tag ``dlq``)."""

    def __init__(self, now_ms: int | None = None) -> None:
        self.now_ms = now_ms  # fixed per run, so a re-run judges "far future" identically
        self.parsed = Metrics.counter(NS, "events_parsed")
        self.rejected = Metrics.counter(NS, "dead_lettered")

    def process(self, raw: pa.Table) -> Iterator:
        if raw.num_rows == 0:
            return
        partitions = raw["kafka_partition"].to_numpy()
        # a reader batch is one partition; stay correct if a caller mixes them
        for p in np.unique(partitions):
            part = raw if len(np.unique(partitions)) == 1 else raw.filter(pc.equal(raw["kafka_partition"], int(p)))
            events, bad = parse_batch(part["value"].to_pylist(), partition=int(p),
                                      offsets=part["kafka_offset"].to_pylist(), keys=part["key"].to_pylist(),
                                      now_ms=self.now_ms)
            self.parsed.inc(events.num_rows)
            if events.num_rows:
                yield events
            if bad.num_rows:
                self.rejected.inc(bad.num_rows)
                for kind, n in zip(*np.unique([reason_kind(r) for r in bad["reason"].to_pylist()],
                                              return_counts=True)):
                    Metrics.counter(NS, f"dlq_{kind}").inc(int(n))
                yield TaggedOutput("dlq", bad)


class ParseRecords(beam.PTransform):
    """``PCollection[pa.Table]`` of raw records -> ``{'events': ..., 'dlq': ...}``."""

    def __init__(self, now_ms: int | None = None) -> None:
        super().__init__()
        self.now_ms = now_ms

    def expand(self, raw):
        return raw | "ParseBatches" >> beam.ParDo(ParseBatchFn(self.now_ms)).with_outputs(
            "dlq", main="events")


class DeadLetterFn(beam.DoFn):
    """Publish rejections to the DLQ topic: original key/value bytes, reason and origin in headers."""

    def __init__(self, kafka: KafkaConfig, source_topic: str, dlq_topic: str, job: str = "pipelines.feature_job"):
        self.kafka, self.source_topic, self.dlq_topic, self.job = kafka, source_topic, dlq_topic, job
        self._producer = None

    def setup(self) -> None:
        from reloop.kafka_io import producer

        self._producer = producer(self.kafka)

    def process(self, bad: pa.Table) -> None:
        futures = []
        d = bad.to_pydict()
        for p, off, reason, key, value in zip(d["kafka_partition"], d["kafka_offset"], d["reason"], d["key"],
                                              d["value"]):
            headers = [("reloop.reason", reason.encode("utf-8", "replace")),
                       ("reloop.source", f"{self.source_topic}/{p}/{off}".encode()),
                       ("reloop.job", self.job.encode())]
            futures.append(self._producer.send(self.dlq_topic, key=key, value=value, headers=headers))
        self._producer.flush()
        for f in futures:  # raise (and fail the run, so offsets are not committed) if any was not delivered
            f.get(timeout=30)

    def teardown(self) -> None:
        if self._producer is not None:
            self._producer.close()


class WriteDeadLetters(beam.PTransform):
    def __init__(self, kafka: KafkaConfig, source_topic: str, dlq_topic: str) -> None:
        super().__init__()
        self.kafka, self.source_topic, self.dlq_topic = kafka, source_topic, dlq_topic

    def expand(self, bad):
        return bad | "PublishDLQ" >> beam.ParDo(DeadLetterFn(self.kafka, self.source_topic, self.dlq_topic))


@dataclass(frozen=True)
class BatchResult:
    examples: pa.Table
    users: pa.Table
    items: pa.Table
    state: FeatureState
    stats: dict[str, int]


def compute_batch(events: pa.Table, state: FeatureState, cfg: AggregateConfig) -> BatchResult:
    """Pure core of :class:`ComputeFeatures`: order the batch, compute features, snapshot touched entities.

    Ties in event time are ordered by (partition, offset) so the result does not depend on the order in
    which the runner delivered the batches. Snapshots are as of just after the newest accepted event.
    """
    if events.num_rows:
        events = events.sort_by([("ts", "ascending"), ("kafka_partition", "ascending"),
                                 ("kafka_offset", "ascending")])
    feats, new_state, stats = compute_features(events, state, cfg)
    users = pc.unique(feats["user_id"]).to_pylist() if feats.num_rows else []
    items = pc.unique(feats["item_id"]).to_pylist() if feats.num_rows else []
    u, i = snapshot(new_state, new_state.watermark + 1, cfg, users=sorted(users), items=sorted(items))
    return BatchResult(feats, u, i, new_state, stats)


class ComputeFeaturesFn(beam.DoFn):
    """All event batches of the micro-batch (one key) -> examples + snapshots; saves the new state."""

    def __init__(self, state_uri: str, start_key: str, stop_key: str, fresh_start: bool, cfg: AggregateConfig):
        self.state_uri, self.start_key, self.stop_key = state_uri, start_key, stop_key
        self.fresh_start, self.cfg = fresh_start, cfg
        self.counters = {k: Metrics.counter(NS, k) for k in ("accepted", "late", "duplicates")}

    def process(self, keyed: tuple[int, Iterable[pa.Table]]) -> Iterator:
        from pipelines.checkpoint import StateStore

        store = StateStore(self.state_uri)
        state = store.load_state(self.start_key)
        if state is None:
            if not self.fresh_start:
                raise RuntimeError(f"no feature state for the committed offsets (key {self.start_key}) under "
                                   f"{self.state_uri}; reset the job (reloop features --reset) to recompute")
            state = FeatureState.empty()
        res = compute_batch(concat_events(list(keyed[1])), state, self.cfg)
        store.save_state(self.stop_key, res.state)
        for k, c in self.counters.items():
            c.inc(res.stats[k])
        yield TaggedOutput("examples", res.examples)
        yield TaggedOutput("snapshots", ("user", res.users))
        yield TaggedOutput("snapshots", ("item", res.items))


class ComputeFeatures(beam.PTransform):
    """``PCollection[pa.Table]`` of events -> ``{'examples': pa.Table, 'snapshots': (entity, pa.Table)}``.

    The micro-batch is aggregated as one unit (a single key): the features of an event depend on every
    earlier event of its user and of its item, across partitions.
    """

    def __init__(self, state_uri: str, start_key: str, stop_key: str, fresh_start: bool,
                 cfg: AggregateConfig = AggregateConfig()) -> None:
        super().__init__()
        self.args = (state_uri, start_key, stop_key, fresh_start, cfg)

    def expand(self, events):
        return (events
                | "KeyAll" >> beam.Map(lambda t: (0, t)).with_output_types(tuple[int, pa.Table])
                | "GatherMicroBatch" >> beam.GroupByKey()
                | "Aggregate" >> beam.ParDo(ComputeFeaturesFn(*self.args)).with_outputs(
                    "examples", "snapshots"))


def example_partitions(examples: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """``(dt=YYYY-MM-DD, rows)`` of a time-sorted example table, by the UTC date of the event.

    >>> t = pa.table({"ts": [0, 1, 86_400_000]})
    >>> [(d, r.num_rows) for d, r in example_partitions(t)]
    [('dt=1970-01-01', 2), ('dt=1970-01-02', 1)]
    """
    import datetime as _dt

    days = examples["ts"].to_numpy() // DAY_MS
    for day in np.unique(days):
        date = _dt.date(1970, 1, 1) + _dt.timedelta(days=int(day))
        yield f"dt={date.isoformat()}", examples.filter(pa.array(days == day))


class WriteExamplesFn(beam.DoFn):
    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.written = Metrics.counter(NS, "examples_written")

    def process(self, examples: pa.Table) -> None:
        from pipelines.checkpoint import filesystem, write_parquet_atomic

        fs, root = filesystem(self.uri)
        for part, rows in example_partitions(examples):
            write_parquet_atomic(fs, f"{root}/{part}/part-{self.run_id}.parquet", rows)
        self.written.inc(examples.num_rows)


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
        from pipelines.feast_io import open_store

        self._store = open_store(self.feast, self.repo_path)

    def process(self, element: tuple[str, pa.Table]) -> None:
        from pipelines.feast_io import ITEM_VIEW, USER_VIEW, write_snapshot

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
