"""The Beam transforms of the contract-v2 feature job: two topics -> parse -> attribution join -> sinks.

Elements are Arrow tables, as in :mod:`pipelines.transforms` (whose example, Feast and dead-letter sinks
are reused). Feedback partitions are numbered from :data:`pipelines.join.FEEDBACK_PARTITION_BASE` inside
the job, so one plan, one time-aligned cut and one state cover both topics.

Counters (namespace ``feature_job``) besides the v1 ones: ``impressions_parsed``, ``feedback_parsed`` and
every counter of :data:`pipelines.join.COUNTERS` (``join_<name>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from pipelines import arrow_coder  # noqa: F401  (registers the pa.Table coder)
from pipelines.checkpoint import StateStore
from pipelines.config import KafkaConfig
from pipelines.join import (
    COUNTERS,
    FEEDBACK_PARTITION_BASE,
    FEEDBACK_SCHEMA,
    JoinConfig,
    JoinState,
    join_batch,
    join_snapshot,
    parse_feedback_records,
    parse_impressions,
)
from pipelines.parse import concat_events
from pipelines.transforms import (
    NS,
    DeadLetterFn,
    PartitionParseFn,
    align_partitions,
    before_cut,
    idle_partitions,
    lagging_partitions,
    start_state,
)


class ParseImpressionsFn(PartitionParseFn):
    """Raw impression records -> impressions (main), v1 immediate clicks (``feedback``), rejections (``dlq``)."""

    PARSED = "impressions_parsed"

    def parse_partition(self, part: pa.Table, partition: int) -> tuple[pa.Table, list[tuple[str, pa.Table]], pa.Table]:
        imps, fb, bad = parse_impressions(
            part["value"],
            partition=partition,
            offsets=part["kafka_offset"].to_numpy(),
            keys=part["key"],
            now_ms=self.now_ms,
        )
        return imps, [("feedback", fb)], bad


class ParseFeedbackFn(PartitionParseFn):
    """Raw feedback records -> feedback rows on joint partition numbers (main), rejections (``dlq``)."""

    PARSED = "feedback_parsed"

    def __init__(self, now_ms: int | None, kinds: tuple[str, ...] | None = None) -> None:
        super().__init__(now_ms)
        self.kinds = kinds

    def parse_partition(self, part: pa.Table, partition: int) -> tuple[pa.Table, list[tuple[str, pa.Table]], pa.Table]:
        fb, bad = parse_feedback_records(
            part["value"],
            partition=FEEDBACK_PARTITION_BASE + partition,
            offsets=part["kafka_offset"].to_numpy(),
            keys=part["key"],
            now_ms=self.now_ms,
            kinds=self.kinds,
        )
        return fb, [], bad


class JoinFn(beam.DoFn):
    """All impression and feedback batches of the micro-batch (one key) -> labelled examples, Feast
    snapshots, orphan feedback for the DLQ and the completed offsets; saves the new join state.

    The exactly-once steps are those of ``ComputeFeaturesFn``: the state of the committed offsets is loaded,
    the run's cut is saved as its result (a re-run reuses it), the new state is saved under the key of the
    cut's offsets, and the sinks only see outputs after that.
    """

    def __init__(
        self,
        state_uri: str,
        plan,
        cfg: JoinConfig,
        kafka: KafkaConfig | None = None,
        topics: tuple[str, str] | None = None,
    ) -> None:
        self.state_uri, self.plan, self.cfg, self.kafka, self.topics = state_uri, plan, cfg, kafka, topics
        self.counters = {k: Metrics.counter(NS, f"join_{k}") for k in COUNTERS}
        self.deferred = Metrics.counter(NS, "deferred")

    def process(self, keyed: tuple[int, Iterable[tuple[str, pa.Table]]]) -> Iterator:
        plan = self.plan
        store = StateStore(self.state_uri)
        state = start_state(store.load_join_state, plan, self.state_uri, "join", JoinState.empty)
        parts = list(keyed[1])
        imps = concat_events([t for k, t in parts if k == "i"])
        fbs = [t for k, t in parts if k == "f"]
        fb = pa.concat_tables(fbs) if fbs else FEEDBACK_SCHEMA.empty_table()
        prior = store.load_result(plan.run_id)
        if prior is not None:
            stops = {**plan.stop, **prior}
        else:
            # one cut over both topics: (ts, partition, offset) of every record read
            both = pa.table(
                {
                    "ts": pa.concat_arrays([imps["ts"].combine_chunks().cast(pa.int64()), fb["ts"].combine_chunks()]),
                    "kafka_partition": pa.concat_arrays(
                        [imps["kafka_partition"].combine_chunks(), fb["kafka_partition"].combine_chunks()]
                    ),
                    "kafka_offset": pa.concat_arrays(
                        [imps["kafka_offset"].combine_chunks(), fb["kafka_offset"].combine_chunks()]
                    ),
                }
            )
            # a v1 record yields an impression and a click on one offset: both are kept or deferred together
            idle = self._idle_partitions()
            _, stops = align_partitions(both, plan.stop, idle, lagging_partitions(plan, idle, state.partition_ts))
        kept_i, kept_f = before_cut(imps, stops), before_cut(fb, stops)
        # every partition of both topics holds the watermark, unless idle too long by the plan's clock
        res = join_batch(kept_i, kept_f, state, self.cfg, partitions=list(plan.stop), now_ms=plan.planned_at_ms)
        store.save_join_state(plan.with_stops(stops).stop_key, res.state)
        store.save_result(plan.run_id, stops)
        for k, v in res.stats.items():
            self.counters[k].inc(v)
        self.deferred.inc(imps.num_rows + fb.num_rows - kept_i.num_rows - kept_f.num_rows)
        yield TaggedOutput("stops", stops)  # after save_result: any sink output implies the cut is on disk
        if res.examples.num_rows:
            yield TaggedOutput("examples", res.examples)
        if res.dlq.num_rows:
            yield TaggedOutput("dlq", res.dlq)
        users = sorted(set(kept_i["user_id"].to_pylist())) if kept_i.num_rows else []
        items = sorted(set(kept_i["item_id"].to_pylist())) if kept_i.num_rows else []
        if users:
            u, i = join_snapshot(res.state, self.cfg.features, users, items)
            yield TaggedOutput("snapshots", ("user", u))
            yield TaggedOutput("snapshots", ("item", i))

    def _idle_partitions(self) -> set[int]:
        """Joint partitions whose log end has not moved past the plan (see :func:`idle_partitions`)."""
        if self.topics is None:
            return set()
        return idle_partitions(
            self.kafka, self.plan.stop, [(0, self.topics[0]), (FEEDBACK_PARTITION_BASE, self.topics[1])]
        )


class JointDeadLetterFn(DeadLetterFn):
    """Dead-letters records of one topic of the joint plan: joint partition numbers back to the topic's,
    and, with ``stops``, only those before the run's cut."""

    def __init__(self, kafka: KafkaConfig, source_topic: str, dlq_topic: str, base: int) -> None:
        super().__init__(kafka, source_topic, dlq_topic)
        self.base = base

    def process(self, bad: pa.Table, stops: dict[int, int] | None = None) -> None:  # type: ignore[override]
        if self.base and bad.num_rows and int(pc.min(bad["kafka_partition"]).as_py()) < self.base:
            bad = bad.set_column(0, "kafka_partition", pc.add(bad["kafka_partition"], self.base))
        if stops is not None:
            bad = before_cut(bad, stops)
        local = bad.set_column(0, "kafka_partition", pc.subtract(bad["kafka_partition"], self.base))
        super().process(local, None)
