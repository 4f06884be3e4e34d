"""`reloop replay` against the real broker: every event comes back, also across a broker restart."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.config import KafkaConfig
from pipelines.events import Event, parse_event
from pipelines.kafka_io import end_offsets, read_range
from reloop.datasets import load_dataset
from reloop.replay import replay_table
from tests.conftest import free_port

pytestmark = pytest.mark.integration
N = 5000


def consume_all(cfg: KafkaConfig, topic: str) -> list[tuple[bytes, bytes]]:
    out = []
    for partition, end in end_offsets(cfg, topic).items():
        out += [(k, v) for _, k, v in read_range(cfg, topic, partition, 0, end)]
    return out


def assert_same_events(records: list[tuple[bytes, bytes]], n: int) -> None:
    table = load_dataset("movielens-100k", limit=n)
    want = {r["event_id"]: r for r in table.to_pylist()}
    assert len(records) == n, f"expected {n} records, got {len(records)}"
    seen = set()
    for key, value in records:
        ev = parse_event(value)
        assert isinstance(ev, Event), ev
        w = want[ev.event_id]
        assert (ev.ts, ev.user_id, ev.item_id, ev.label) == (w["ts"], w["user_id"], w["item_id"], w["label"])
        assert key == ev.user_id.encode(), "key = user id"
        seen.add(ev.event_id)
    assert seen == set(want), "each event exactly once"


def test_reloop_replay_then_consume_every_event_back(kafka_config, unique_topic):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reloop.cli",
            "replay",
            "--dataset",
            "movielens-100k",
            "--limit",
            str(N),
            "--topic",
            unique_topic,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"replayed {N:,} events to {unique_topic}" in proc.stdout
    assert_same_events(consume_all(kafka_config, unique_topic), N)


def test_broker_killed_and_restarted_between_produce_and_consume_loses_nothing(tmp_path, unique_topic):
    from reloop.services import Kafka

    broker = Kafka(root=tmp_path, port=free_port(), controller_port=free_port())
    broker.start()
    try:
        cfg = KafkaConfig(bootstrap_servers=broker.address())
        stats = replay_table(load_dataset("movielens-100k", limit=N), cfg, topic=unique_topic)
        assert stats.events == N
        broker.kill()  # SIGKILL: no clean shutdown
        assert broker.pid() is None
        broker.start()
        assert_same_events(consume_all(cfg, unique_topic), N)
    finally:
        broker.stop()


def test_replay_sends_only_the_event_contract(kafka_config, unique_topic):
    """The replay's own bookkeeping (partition column) never leaks into the events' context."""
    import pyarrow as pa

    table = load_dataset("movielens-100k", limit=50)
    table = table.append_column("device", pa.array(["web"] * 50))
    replay_table(table, kafka_config, topic=unique_topic, workers=2)
    records = consume_all(kafka_config, unique_topic)
    assert len(records) == 50
    for _, value in records:
        ev = parse_event(value)
        assert isinstance(ev, Event) and ev.context == {"device": "web"}, value


def test_asking_about_a_missing_topic_never_creates_it(kafka_config, unique_topic):
    """Even on a broker with auto.create.topics.enable=true, looking a topic up must not create it with the
    broker's default partition count before ensure_topics creates it as asked."""
    import time

    from pipelines.kafka_io import ensure_topics

    assert end_offsets(kafka_config, unique_topic) == {}
    time.sleep(0.5)  # auto-creation would be asynchronous
    assert end_offsets(kafka_config, unique_topic) == {}
    ensure_topics(kafka_config, [unique_topic], partitions=1)
    assert end_offsets(kafka_config, unique_topic) == {0: 0}
