"""Kafka client glue shared by replay, the feature job, the DLQ and the alerts topic.

Everything here takes a :class:`reloop.config.KafkaConfig`, so bootstrap
servers and security settings (SASL/SSL) pass through unchanged from the
config file to every client.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from reloop.config import KafkaConfig


def admin(cfg: KafkaConfig) -> KafkaAdminClient:
    return KafkaAdminClient(**cfg.client_options(), request_timeout_ms=10_000)


def ensure_topics(cfg: KafkaConfig, topics: Iterable[str], partitions: int | None = None) -> None:
    """Create the topics that do not exist yet (replication factor 1 on the embedded broker)."""
    client = admin(cfg)
    try:
        existing = set(client.list_topics())
        new = [NewTopic(t, partitions or cfg.partitions, 1) for t in topics if t not in existing]
        if new:
            try:
                client.create_topics(new)
            except TopicAlreadyExistsError:  # a concurrent creator won the race: fine
                pass
    finally:
        client.close()


def producer(cfg: KafkaConfig, **overrides) -> KafkaProducer:
    """An idempotent producer (acks=all), batched for throughput on loopback."""
    opts = dict(acks="all", enable_idempotence=True, linger_ms=5, batch_size=256 * 1024,
                max_request_size=4 * 1024 * 1024)
    opts.update(overrides)
    return KafkaProducer(**cfg.client_options(), **opts)


def end_offsets(cfg: KafkaConfig, topic: str) -> dict[int, int]:
    """The log-end offset of every partition of ``topic``."""
    consumer = KafkaConsumer(**cfg.client_options(), enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        return {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def read_batches(cfg: KafkaConfig, topic: str, partition: int, start: int, stop: int, batch_size: int = 5000,
                 timeout_s: float = 60.0) -> Iterator[tuple[list[int], list, list]]:
    """Yield ``(offsets, keys, values)`` lists for offsets ``[start, stop)`` of one partition, in order.

    Uses ``assign`` + ``seek`` + ``poll`` until the position reaches ``stop``; no consumer group is
    involved, so reading is side-effect free and repeatable; one poll's records come out as one batch.
    CRCs are not re-checked on the client (``check_crcs=False``): the broker validated them on produce
    and TCP protects the fetch, and kafka-python's pure-Python CRC32C costs 2/3 of the read time.
    """
    if stop <= start:
        return
    consumer = KafkaConsumer(**cfg.client_options(), enable_auto_commit=False, group_id=None,
                             max_poll_records=batch_size, fetch_max_bytes=64 * 1024 * 1024,
                             max_partition_fetch_bytes=16 * 1024 * 1024, check_crcs=False,
                             retry_backoff_ms=20)  # an idle first poll sleeps this long (default 100 ms)
    tp = TopicPartition(topic, partition)
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + timeout_s
        while True:
            records = consumer.poll(timeout_ms=1000).get(tp, [])
            if records:
                deadline = time.monotonic() + timeout_s
                if records[-1].offset >= stop:
                    records = [r for r in records if r.offset < stop]
                if records:
                    yield [r.offset for r in records], [r.key for r in records], [r.value for r in records]
                if not records or records[-1].offset + 1 >= stop:
                    return
            elif consumer.position(tp) >= stop:
                return
            elif time.monotonic() > deadline:
                raise TimeoutError(f"{topic}[{partition}]: no records for {timeout_s:.0f}s "
                                   f"while reading offsets {start}..{stop}")
    finally:
        consumer.close()


def read_range(cfg: KafkaConfig, topic: str, partition: int, start: int, stop: int,
               timeout_s: float = 60.0) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """Yield ``(offset, key, value)`` for offsets ``[start, stop)`` of one partition, in order (see
    :func:`read_batches`)."""
    for offsets, keys, values in read_batches(cfg, topic, partition, start, stop, timeout_s=timeout_s):
        yield from zip(offsets, keys, values)


def partition_count(cfg: KafkaConfig, topic: str) -> int:
    """How many partitions ``topic`` has (waits briefly for the metadata of a new topic)."""
    consumer = KafkaConsumer(**cfg.client_options(), enable_auto_commit=False)
    try:
        for _ in range(50):
            parts = consumer.partitions_for_topic(topic)
            if parts:
                return len(parts)
            time.sleep(0.1)
            consumer.topics()  # refresh metadata
        raise RuntimeError(f"topic {topic} has no partitions in the metadata of {cfg.bootstrap_servers}")
    finally:
        consumer.close()
