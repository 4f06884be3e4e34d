"""Read bounded offset ranges of Kafka partitions in Beam: a splittable DoFn over ``OffsetRange``.

Beam's own ``ReadFromKafka`` is a Java cross-language transform that the local
Python runners cannot execute; this reader uses kafka-python
(:class:`pipelines.kafka_io.RangeReader`: fetches to the partition leader, no
consumer group, so reading has no side effects, record batches decoded
vectorised) and runs on FnApiRunner and on every distributed runner. Each range is split into
chunks up front (``chunk_size`` offsets), so a distributed runner reads
chunks in parallel, and the tracker also supports dynamic splitting.

Elements out are Arrow tables of :data:`pipelines.parse.RAW_SCHEMA`
(``kafka_partition, kafka_offset, key, value``), ``batch_size`` records each:
one Python object per batch, not per record.
"""

from collections.abc import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.transforms.core import RestrictionProvider

from pipelines import arrow_coder  # noqa: F401  (registers the pa.Table coder)
from pipelines.checkpoint import PartitionRange  # noqa: F401  (re-exported: the Beam-free plan type)
from pipelines.config import KafkaConfig
from pipelines.kafka_io import RangeReader
from pipelines.kafka_records import RecordColumns
from pipelines.parse import RAW_SCHEMA


def raw_table(partition: int, offsets, keys, values) -> pa.Table:
    """A :data:`RAW_SCHEMA` table from offsets, keys and values (lists, arrays or Arrow arrays)."""
    return pa.Table.from_arrays(
        [
            pa.array(np.full(len(offsets), partition, np.int32)),
            pa.array(np.asarray(offsets, np.int64)),
            pa.array(keys, pa.binary()),
            pa.array(values, pa.binary()),
        ],
        schema=RAW_SCHEMA,
    )


class ReadOffsetRangesFn(beam.DoFn, RestrictionProvider):
    """Splittable DoFn: ``PartitionRange`` -> Arrow tables of raw records, in offset order.

    The DoFn is its own restriction provider (restriction = ``OffsetRange`` of the partition).
    """

    def __init__(
        self, kafka: KafkaConfig, batch_size: int = 5000, chunk_size: int = 50_000, timeout_s: float = 60.0
    ) -> None:
        self.kafka = kafka
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s
        self.records_read = beam.metrics.Metrics.counter("feature_job", "records_read")

    # -- RestrictionProvider
    def initial_restriction(self, element: PartitionRange) -> OffsetRange:
        return OffsetRange(element.start, element.stop)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def split(self, element: PartitionRange, restriction: OffsetRange):
        yield from restriction.split(self.chunk_size, min(self.chunk_size, 1000))

    def restriction_size(self, element: PartitionRange, restriction: OffsetRange) -> int:
        return restriction.size()

    # -- DoFn
    def setup(self) -> None:
        self._reader = RangeReader(self.kafka, timeout_s=self.timeout_s)  # one connection for a bundle's ranges

    def finish_bundle(self) -> None:
        # reconnects lazily in the next bundle: a worker between bundles (or a runner that never calls
        # teardown) holds no connection that would keep retrying a broker that went away
        self._reader.close()

    def teardown(self) -> None:
        self._reader.close()

    def process(self, element: PartitionRange, tracker=beam.DoFn.RestrictionParam()) -> Iterator[pa.Table]:  # type: ignore[override]
        r = tracker.current_restriction()
        for cols in self._reader.read(element.topic, element.partition, r.start, r.stop):
            for lo in range(0, len(cols), self.batch_size):
                out, done = self._claim(tracker, element.partition, cols.slice(lo, lo + self.batch_size))
                if out is not None:
                    yield out
                if done:
                    return
        # offsets missing at the end of the range (compaction, transaction markers): finish the restriction
        tracker.try_claim(tracker.current_restriction().stop)

    def _claim(self, tracker, partition: int, cols: RecordColumns) -> tuple[pa.Table | None, bool]:
        """Claim a whole batch by its last offset; if the runner split the range meanwhile, keep our part."""
        if tracker.try_claim(int(cols.offsets[-1])):
            self.records_read.inc(len(cols))
            return raw_table(partition, cols.offsets, cols.keys, cols.values), False
        n = int(np.searchsorted(cols.offsets, tracker.current_restriction().stop))
        if n == 0 or not tracker.try_claim(int(cols.offsets[n - 1])):
            return None, True
        self.records_read.inc(n)
        cols = cols.slice(0, n)
        return raw_table(partition, cols.offsets, cols.keys, cols.values), True


class ReadKafkaRanges(beam.PTransform):
    """``PCollection[PartitionRange]`` -> ``PCollection[pa.Table]`` of raw records."""

    def __init__(self, kafka: KafkaConfig, batch_size: int = 5000, chunk_size: int = 50_000) -> None:
        super().__init__()
        self.kafka, self.batch_size, self.chunk_size = kafka, batch_size, chunk_size

    def expand(self, ranges):
        return ranges | "ReadRanges" >> beam.ParDo(
            ReadOffsetRangesFn(self.kafka, self.batch_size, self.chunk_size)
        ).with_output_types(pa.Table)
