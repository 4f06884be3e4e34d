"""The vectorised record-batch decoder against kafka-python's own record iteration, and on the real broker."""

from __future__ import annotations

import random

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords, MemoryRecordsBuilder

from pipelines.kafka_records import decode_records

GZIP, ZSTD = 1, 4


def build(
    records: list[tuple[bytes | None, bytes | None, list]], offset: int = 0, codec: int = 0, per_batch: int = 50
) -> bytes:
    """Several v2 batches, ``per_batch`` records each, as a fetch response would carry them."""
    out = b""
    for lo in range(0, len(records), per_batch):
        b = MemoryRecordsBuilder(magic=2, compression_type=codec, batch_size=1 << 24, offset=offset + lo)
        for i, (k, v, headers) in enumerate(records[lo : lo + per_batch]):
            b.append(timestamp=1_700_000_000_000 + i, key=k, value=v, headers=headers)
        b.close()
        out += bytes(b.buffer())
    return out


def reference(buf: bytes, fetch_offset: int = 0) -> list[tuple[int, bytes | None, bytes | None]]:
    """kafka-python's per-record decoding of the same bytes."""
    mr, out = MemoryRecords(buf), []
    while (batch := mr.next_batch()) is not None:
        if not batch.is_control_batch:
            out += [(r.offset, r.key, r.value) for r in batch if r.offset >= fetch_offset]
    return out


def random_records(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _i in range(n):
        key = None if rng.random() < 0.2 else rng.randbytes(rng.choice([0, 1, 5, 200]))
        value = None if rng.random() < 0.1 else rng.randbytes(rng.choice([0, 1, 63, 64, 127, 128, 300, 20_000]))
        headers = [("h", rng.randbytes(3))] * rng.choice([0, 0, 1, 3])
        out.append((key, value, headers))
    return out


@pytest.mark.parametrize("codec", [0, GZIP, ZSTD])
@pytest.mark.parametrize("fetch_offset", [100, 137, 100 + 499])
def test_decode_equals_kafka_python(codec: int, fetch_offset: int) -> None:
    buf = build(random_records(500, seed=codec), offset=100, codec=codec)
    cols = decode_records(buf, fetch_offset)
    got = list(zip(cols.offsets.tolist(), cols.keys.to_pylist(), cols.values.to_pylist()))
    assert got == reference(buf, fetch_offset)
    assert cols.next_offset == 600


def test_truncated_last_batch_is_left_for_the_next_fetch() -> None:
    buf = build(random_records(100, seed=1), per_batch=40)
    cols = decode_records(buf[:-10])
    assert cols.offsets.tolist() == list(range(80)) and cols.next_offset == 80


def test_empty_and_none() -> None:
    for raw in (b"", None):
        cols = decode_records(raw, 5)
        assert len(cols) == 0 and cols.next_offset == 5


@pytest.mark.parametrize("where", ["record length", "key length"])
def test_corrupt_record_is_a_clear_error(where: str) -> None:
    buf = bytearray(build([(b"key", b"value-%d" % i, []) for i in range(3)]))
    first_record = 61  # v2 batch header size
    # a record length or a key length that points past the record: the batch cannot be decoded
    buf[first_record + (0 if where == "record length" else 4)] = 0x7E
    with pytest.raises(CorruptRecordError):
        decode_records(bytes(buf))


@pytest.mark.integration
def test_range_reader_on_the_broker_with_compression_and_headers(kafka_config, unique_topic) -> None:
    """Records produced with gzip and headers read back by RangeReader equal a KafkaConsumer's poll."""
    from pipelines.kafka_io import RangeReader, ensure_topics, producer

    ensure_topics(kafka_config, [unique_topic], partitions=1)
    recs = random_records(3000, seed=7)
    prod = producer(kafka_config, compression_type="gzip", max_request_size=8 * 1024 * 1024)
    for k, v, h in recs:
        prod.send(unique_topic, key=k, value=v if v is not None else b"", headers=h, partition=0)
    prod.flush()
    prod.close()

    with RangeReader(kafka_config, max_partition_bytes=256 * 1024) as reader:  # many fetches
        got = [
            (o, k, v)
            for c in reader.read(unique_topic, 0, 10, 2990)
            for o, k, v in zip(c.offsets.tolist(), c.keys.to_pylist(), c.values.to_pylist())
        ]

    consumer = KafkaConsumer(**kafka_config.client_options(), enable_auto_commit=False)
    tp = TopicPartition(unique_topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 10)
    want = []
    while len(want) < 2980:
        want += [(r.offset, r.key, r.value) for r in consumer.poll(timeout_ms=2000).get(tp, [])]
    consumer.close()
    assert got == want[:2980]
    assert np.all(np.diff([o for o, _, _ in got]) == 1)
