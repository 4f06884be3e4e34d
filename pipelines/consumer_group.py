"""The consumer group's committed offsets: read them, plan the next micro-batch, commit after the sinks.

Only the driver of the feature job talks to the group; the Beam workers read
offset ranges without a group (see :mod:`pipelines.kafka_source`).
"""

from __future__ import annotations

import time

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import GroupIdNotFoundError
from kafka.structs import OffsetAndMetadata

from online_models.errors import ReloopError
from pipelines.checkpoint import Plan, StateStore
from pipelines.config import KafkaConfig
from pipelines.kafka_io import admin, topic_partitions


class OffsetsError(ReloopError, RuntimeError):
    """The topic or the group's offsets are not in a state the job can continue from."""


def _consumer(cfg: KafkaConfig, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        **cfg.client_options(),
        group_id=group,
        enable_auto_commit=False,
        request_timeout_ms=30_000,
        allow_auto_create_topics=False,
    )


def partition_offsets(
    cfg: KafkaConfig, topic: str, group: str
) -> tuple[dict[int, int | None], dict[int, int], dict[int, int]]:
    """``(committed, beginning, end)`` per partition of ``topic`` (committed is None where never committed)."""
    consumer = _consumer(cfg, group)
    try:
        parts = topic_partitions(consumer, topic)
        if not parts:
            raise OffsetsError(f"topic {topic} does not exist on {cfg.bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        committed = {tp.partition: consumer.committed(tp) for tp in tps}
        begin = {tp.partition: o for tp, o in consumer.beginning_offsets(tps).items()}
        end = {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
        return committed, begin, end
    finally:
        consumer.close()


def plan_run(
    cfg: KafkaConfig,
    topic: str,
    group: str,
    store: StateStore,
    max_events: int | None = None,
    now_ms: int | None = None,
) -> Plan:
    """The next micro-batch: the pending plan of an interrupted run, or committed -> end offsets.

    ``max_events`` caps the batch (split evenly over the partitions that have new events).
    """
    committed, begin, end = partition_offsets(cfg, topic, group)
    done = {p: o for p, o in committed.items() if o is not None}
    start = {p: (done[p] if p in done else begin[p]) for p in committed}
    probe = Plan(topic, start, start, 0, done)
    pending = store.load_pending(probe.start_key)
    if pending is not None and pending.start == start:
        bad = {p: (pending.stop[p], end[p]) for p in pending.stop if pending.stop[p] > end[p]}
        if bad:
            raise OffsetsError(
                f"{topic}: the interrupted run planned offsets beyond the log end {bad}; "
                f"was the topic recreated? Reset the job state (reloop features --reset)."
            )
        return pending
    stop = dict(end)
    if max_events is not None:
        busy = [p for p in start if end[p] > start[p]]
        share = -(-max_events // max(1, len(busy)))
        stop = {p: min(end[p], start[p] + share) for p in start}
    return Plan(topic, start, stop, now_ms if now_ms is not None else int(time.time() * 1000), done)


def commit(cfg: KafkaConfig, plan: Plan, group: str) -> None:
    """Commit the stop offsets of every partition the run read (metadata = the run id)."""
    offsets = {
        TopicPartition(plan.topic, p): OffsetAndMetadata(o, plan.run_id, -1)
        for p, o in plan.committed_after.items()
        if o != plan.committed.get(p)
    }
    if not offsets:
        return
    consumer = _consumer(cfg, group)
    try:
        consumer.commit(offsets)
    finally:
        consumer.close()


def reset(cfg: KafkaConfig, group: str) -> None:
    """Forget the group's offsets (delete the group), so the next run starts from the beginning."""
    client = admin(cfg)
    try:
        result = client.delete_groups([group])
        # kafka-python 3 answers {group: "OK" or an error class name}; a missing group is fine
        for gid, err in result.items() if isinstance(result, dict) else result:
            name = err if isinstance(err, str) else getattr(err, "__name__", type(err).__name__)
            if err is not None and name not in ("OK", "NoError", "NoneType", GroupIdNotFoundError.__name__):
                raise OffsetsError(f"cannot delete consumer group {gid}: {name}")
    except GroupIdNotFoundError:
        pass
    finally:
        client.close()
