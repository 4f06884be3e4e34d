"""Kafka client glue shared by replay, the feature job, the DLQ and the alerts topic.

Everything here takes a :class:`reloop.config.KafkaConfig`, so bootstrap
servers and security settings (SASL/SSL) pass through unchanged from the
config file to every client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as Errors
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.partitioner.default import murmur2
from kafka.protocol.consumer import FetchRequest, IsolationLevel

from pipelines.config import KafkaConfig
from pipelines.kafka_records import RecordColumns, decode_records


def admin(cfg: KafkaConfig) -> KafkaAdminClient:
    return KafkaAdminClient(**cfg.client_options(), request_timeout_ms=10_000)


def ensure_topics(cfg: KafkaConfig, topics: Iterable[str], partitions: int | None = None) -> None:
    """Create the topics that do not exist yet (replication factor 1 on the embedded broker)."""
    topics = list(topics)
    consumer = KafkaConsumer(**cfg.client_options(), enable_auto_commit=False, allow_auto_create_topics=False)
    try:
        missing = [t for t, parts in topics_partitions(consumer, topics).items() if not parts]
    finally:
        consumer.close()
    if not missing:
        return
    client = admin(cfg)
    try:
        try:
            client.create_topics([NewTopic(t, partitions or cfg.partitions, 1) for t in missing])
        except TopicAlreadyExistsError:  # a concurrent creator won the race: fine
            pass
    finally:
        client.close()


def key_partition(key: str, num_partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (murmur2, as the Java client and kafka-python).

    >>> [key_partition(k, 4) for k in ["196", "186", "22", "244"]]
    [0, 0, 3, 2]
    """
    return (murmur2(key.encode()) & 0x7FFFFFFF) % num_partitions


def producer(cfg: KafkaConfig, **overrides) -> KafkaProducer:
    """An idempotent producer (acks=all), batched for throughput on loopback."""
    opts = dict(
        acks="all", enable_idempotence=True, linger_ms=5, batch_size=256 * 1024, max_request_size=4 * 1024 * 1024
    )
    opts.update(overrides)
    return KafkaProducer(**cfg.client_options(), **opts)


def topic_partitions(consumer: KafkaConsumer, topic: str, refresh: bool = False, timeout_s: float = 10.0) -> set[int]:
    """The partitions of ``topic`` (empty if it does not exist); see :func:`topics_partitions`."""
    return topics_partitions(consumer, [topic], refresh, timeout_s)[topic]


def topics_partitions(
    consumer: KafkaConsumer, topics: list[str], refresh: bool = False, timeout_s: float = 10.0
) -> dict[str, set[int]]:
    """The partitions of each topic (empty if it does not exist), from metadata of these topics only.

    ``KafkaConsumer.partitions_for_topic`` asks the broker for the metadata of every topic, which
    costs ~0.1 s per call on a broker with a few hundred topics; this asks for the ones named, and
    never creates a missing one (whatever the broker's ``auto.create.topics.enable``).
    """
    cluster = consumer._client.cluster
    # kafka-python 3.0 hands neither retry_backoff_ms nor allow_auto_create_topics to its ClusterMetadata:
    # its fixed 100 ms delays any metadata request made within 100 ms of the previous one (e.g. right
    # after bootstrap), and its default would let asking about a missing topic create it
    cluster.config["retry_backoff_ms"] = min(cluster.config["retry_backoff_ms"], 10)
    cluster.config["allow_auto_create_topics"] = False
    if refresh or any(not cluster.partitions_for_topic(t) for t in topics):
        cluster.set_topics(topics)  # exactly these: a missing topic tracked earlier would fail every refresh
        quiet = _MissingTopicFilter(topics)
        logging.getLogger("kafka.cluster").addFilter(quiet)  # a missing topic is an answer here, not an error
        try:
            consumer._net.run(consumer._manager.wait_for, cluster.request_update(), int(timeout_s * 1000))
        except Errors.UnknownTopicOrPartitionError:
            pass  # the topics that exist are in the metadata all the same
        finally:
            logging.getLogger("kafka.cluster").removeFilter(quiet)
    return {t: set(cluster.partitions_for_topic(t) or ()) for t in topics}


class _MissingTopicFilter(logging.Filter):
    """Drops kafka-python's "Topic X not found in cluster metadata" for the topics being looked up."""

    def __init__(self, topics: list[str]) -> None:
        super().__init__()
        self.topics = set(topics)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "Topic %s not found in cluster metadata" and record.args and record.args[0] in self.topics
        )


def end_offsets(cfg: KafkaConfig, topic: str) -> dict[int, int]:
    """The log-end offset of every partition of ``topic``."""
    consumer = KafkaConsumer(**cfg.client_options(), enable_auto_commit=False, allow_auto_create_topics=False)
    try:
        parts = topic_partitions(consumer, topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


class RangeReader:
    """Reads offset ranges of partitions as columns, over one connection reused across ranges.

    A range is fetched with kafka-python's protocol classes (``FetchRequest`` to the partition
    leader, no consumer group, so reading has no side effects and is repeatable) and its record
    batches are decoded by :func:`pipelines.kafka_records.decode_records`, vectorised, instead of one
    ``ConsumerRecord`` per record. CRCs are not re-checked on the client: the broker validated them
    on produce and TCP protects the fetch.

    Usage (needs a broker)::

        with RangeReader(KafkaConfig()) as reader:
            for cols in reader.read("reloop.events", 0, 0, 1000):
                print(len(cols), cols.offsets[0], cols.values[0])
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        *,
        max_partition_bytes: int = 16 * 1024 * 1024,
        max_wait_ms: int = 500,
        timeout_s: float = 60.0,
    ) -> None:
        self.cfg = cfg
        self.max_partition_bytes = max_partition_bytes
        self.max_wait_ms = max_wait_ms
        self.timeout_s = timeout_s
        self._consumer: KafkaConsumer | None = None
        self._topics: set[str] = set()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
            self._topics.clear()

    def read(self, topic: str, partition: int, start: int, stop: int) -> Iterator[RecordColumns]:
        """Columns of the records with offsets in ``[start, stop)``, in order, one per fetch.

        Waits for offsets not written yet (up to ``timeout_s`` without progress, then ``TimeoutError``);
        gaps (compaction, transaction markers) are skipped. An offset below the log start (deleted by
        retention) raises ``OffsetOutOfRangeError``.
        """
        pos = start
        deadline = time.monotonic() + self.timeout_s
        if pos < stop and topic not in self._topics:
            topic_partitions(self._connect(), topic)  # one metadata request: the partitions' leaders
            self._topics.add(topic)
        while pos < stop:
            part = self._fetch(TopicPartition(topic, partition), pos)
            if part is not None:
                cols = decode_records(part.records, pos)
                cut = int(np.searchsorted(cols.offsets, stop))
                if cut:
                    yield cols.slice(0, cut)
                if cols.next_offset > pos:
                    pos = cols.next_offset
                    deadline = time.monotonic() + self.timeout_s
                    continue
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{topic}[{partition}]: no records for {self.timeout_s:.0f}s while reading "
                    f"offsets {start}..{stop} (at {pos})"
                )

    def _fetch(self, tp: TopicPartition, offset: int):
        """One fetch of ``tp`` from ``offset``: the response's partition data, or None after a retriable
        error (the caller retries until its deadline)."""
        consumer = self._connect()
        leader = consumer._client.cluster.leader_for_partition(tp)
        if leader is None or leader < 0:
            return self._retry_later(tp)
        request = FetchRequest(
            max_wait_ms=self.max_wait_ms,
            min_bytes=1,
            max_bytes=self.max_partition_bytes,
            isolation_level=IsolationLevel.READ_UNCOMMITTED,
            session_id=0,
            session_epoch=-1,
            topics=[
                FetchRequest.FetchTopic(
                    topic=tp.topic,
                    partitions=[
                        FetchRequest.FetchTopic.FetchPartition(
                            partition=tp.partition,
                            current_leader_epoch=-1,
                            fetch_offset=offset,
                            last_fetched_epoch=-1,
                            partition_max_bytes=self.max_partition_bytes,
                        )
                    ],
                )
            ],
            forgotten_topics_data=[],
            rack_id="",
            max_version=12,
        )
        manager = consumer._client._manager

        async def send():
            return await manager.send(request, node_id=leader)

        response = manager.run(send)
        part = response.responses[0].partitions[0]
        if part.error_code:
            error = Errors.for_code(part.error_code)
            if not error.retriable:
                raise error(f"fetching {tp.topic}[{tp.partition}] at offset {offset}")
            return self._retry_later(tp)
        return part

    def _retry_later(self, tp: TopicPartition) -> None:
        """After a missing leader or a retriable error (a new or moved partition): back off briefly and
        refresh the topic's metadata; the caller retries until its deadline."""
        time.sleep(0.05)
        topic_partitions(self._connect(), tp.topic, refresh=True)

    def _connect(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = KafkaConsumer(
                **self.cfg.client_options(), enable_auto_commit=False, group_id=None, allow_auto_create_topics=False
            )
        return self._consumer


def read_range(
    cfg: KafkaConfig, topic: str, partition: int, start: int, stop: int, timeout_s: float = 60.0
) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """Yield ``(offset, key, value)`` for offsets ``[start, stop)`` of one partition, in order (see
    :class:`RangeReader`, which yields the same as columns)."""
    with RangeReader(cfg, timeout_s=timeout_s) as reader:
        for cols in reader.read(topic, partition, start, stop):
            yield from zip(cols.offsets.tolist(), cols.keys.to_pylist(), cols.values.to_pylist())


def partition_count(cfg: KafkaConfig, topic: str) -> int:
    """How many partitions ``topic`` has (waits briefly for the metadata of a new topic)."""
    consumer = KafkaConsumer(**cfg.client_options(), enable_auto_commit=False, allow_auto_create_topics=False)
    try:
        for attempt in range(50):
            parts = topic_partitions(consumer, topic, refresh=attempt > 0)
            if parts:
                return len(parts)
            time.sleep(0.1)
        raise RuntimeError(f"topic {topic} has no partitions in the metadata of {cfg.bootstrap_servers}")
    finally:
        consumer.close()
