"""Hostile records on the real broker (issue 18's probe table, stream rows): none crashes, wedges or empties
the feature job; each goes to the DLQ with a reason, and the good events are all accepted.

Each test would fail on c9242f2: deep nesting crashed (SIGSEGV) or raised out of the parser, invalid
UTF-8 failed the compute step, a far-future event made every later event late (counted, not
dead-lettered), a forged duplicate could replace the real event, a reserved context key broke the
example files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_feature_job_integration import job_config

pytestmark = pytest.mark.integration

T0 = 881_250_949_000


def good_events(n: int, start: int = 0, users: int = 50) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(start, start + n):
        u = f"u{i % users}"
        ev = {"event_id": f"g{i}", "ts": T0 + i * 1000, "user_id": u, "item_id": f"i{i % 37}", "label": i % 2}
        out.append((u.encode(), json.dumps(ev, separators=(",", ":")).encode()))
    return out


def produce(kafka, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from pipelines.kafka_io import ensure_topics, producer

    ensure_topics(kafka, [topic])
    prod = producer(kafka, max_request_size=8 * 1024 * 1024)
    for k, v in records:
        prod.send(topic, key=k, value=v)
    prod.flush()
    prod.close()


def drain(cfg) -> list:
    from pipelines.feature_job import run_once

    runs = []
    while (s := run_once(cfg, repo_path=cfg.feast.repo_path)).committed:
        runs.append(s)
    return runs


def dlq_records(kafka, topic: str) -> list:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        **kafka.client_options(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in parts]
    consumer.assign(tps)
    end = consumer.end_offsets(tps)
    out = []
    while any(consumer.position(tp) < end[tp] for tp in tps):
        for recs in consumer.poll(timeout_ms=2000).values():
            out.extend(recs)
    consumer.close()
    return out


def reasons(records) -> list[str]:
    return [dict(r.headers)["reloop.reason"].decode() for r in records]


def total(runs, name: str) -> int:
    return sum(getattr(s, name) for s in runs)


def test_deep_nesting_and_invalid_utf8_are_dead_lettered_and_the_job_keeps_committing(
    tmp_path, kafka_config, unique_topic
):
    cfg = job_config(tmp_path, kafka_config, unique_topic)
    poison = [
        b'{"event_id":"deep","ts":5,"user_id":"u","item_id":"i","label":1,"context":{"a":'
        + b"[" * 20_000
        + b"]" * 20_000
        + b"}}",  # 40 KB, SIGSEGV in pyarrow before
        b"[" * 1_000 + b"]" * 1_000,  # RecursionError out of parse_event
        b'{"event_id":"bad\xff\xfeutf8","ts":%d,"user_id":"u1","item_id":"i1","label":0}' % T0,
    ]
    assert all(len(p) < 64 * 1024 for p in poison)
    good = good_events(1_000)
    records = (
        good[:300] + [(b"u1", poison[0])] + good[300:600] + [(b"u1", poison[1])] + good[600:] + [(b"u1", poison[2])]
    )
    produce(kafka_config, unique_topic, records)
    runs = drain(cfg)
    assert runs and total(runs, "accepted") == 1_000 and total(runs, "dead_lettered") == 3
    why = sorted(reasons(dlq_records(kafka_config, cfg.kafka.dlq_topic)))
    assert why[0].startswith("invalid UTF-8") and all(w.startswith("too deeply nested") for w in why[1:]), why
    # not wedged: new events after the poison are processed and committed by the next run
    produce(kafka_config, unique_topic, good_events(200, start=1_000))
    more = drain(cfg)
    assert more and total(more, "accepted") == 200


def test_a_failed_run_does_not_wedge_the_job(tmp_path, kafka_config, unique_topic, monkeypatch):
    """The saved plan of a failed run is redone; with the poison quarantined it now completes."""
    import pipelines.parse
    from pipelines.feature_job import run_once

    cfg = job_config(tmp_path, kafka_config, unique_topic)
    produce(kafka_config, unique_topic, good_events(500) + [(b"u1", b"[" * 5_000)])
    real = pipelines.parse._fast_parse

    def crash(*a, **k):  # the old failure mode: an exception escaping the batch parser
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(pipelines.parse, "_fast_parse", crash)
    monkeypatch.setattr(pipelines.parse, "parse_event", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    s = run_once(cfg, repo_path=cfg.feast.repo_path)  # every record quarantined by bisection: no crash
    assert s.committed and s.accepted == 0 and s.dead_lettered == 501
    monkeypatch.setattr(pipelines.parse, "_fast_parse", real)
    monkeypatch.undo()
    produce(kafka_config, unique_topic, good_events(100, start=500))
    runs = drain(cfg)
    assert total(runs, "accepted") == 100


def test_a_far_future_event_is_dead_lettered_and_does_not_make_the_stream_late(tmp_path, kafka_config, unique_topic):
    import time

    cfg = job_config(tmp_path, kafka_config, unique_topic)
    future = {
        "event_id": "future",
        "ts": int(time.time() * 1000) + 23 * 3600 * 1000,
        "user_id": "u7",
        "item_id": "i1",
        "label": 1,
    }
    # alone first, in the same batch as the good ones, then again alone after the state exists
    produce(kafka_config, unique_topic, [(b"u7", json.dumps(future).encode())] + good_events(5_000))
    runs = drain(cfg)
    produce(kafka_config, unique_topic, [(b"u7", json.dumps(dict(future, event_id="future2")).encode())])
    runs += drain(cfg)
    produce(kafka_config, unique_topic, good_events(1_000, start=5_000))
    runs += drain(cfg)
    assert total(runs, "accepted") == 6_000 and total(runs, "late") == 0
    why = reasons(dlq_records(kafka_config, cfg.kafka.dlq_topic))
    assert len(why) == 2 and all(w.startswith("ahead") for w in why), why


def test_the_first_copy_of_an_event_id_wins_and_forged_copies_are_dead_lettered(tmp_path, kafka_config, unique_topic):
    cfg = job_config(tmp_path, kafka_config, unique_topic)
    good = good_events(2_000)
    forged = []
    for i in range(0, 2_000, 77):  # 26 forged copies: label flipped, same key, earlier or same ts
        ev = json.loads(good[i][1])
        forged.append((good[i][0], json.dumps(dict(ev, label=1 - ev["label"], ts=ev["ts"] - (i % 2))).encode()))
    assert len(forged) == 26
    # half the forged copies right after the real one (same batch), half in a later run
    records = []
    for i, rec in enumerate(good):
        records.append(rec)
        if i % 77 == 0 and (i // 77) % 2 == 0:
            records.append(forged[i // 77])
    produce(kafka_config, unique_topic, records)
    runs = drain(cfg)
    produce(kafka_config, unique_topic, [f for j, f in enumerate(forged) if j % 2 == 1])
    runs += drain(cfg)
    assert total(runs, "accepted") == 2_000 and total(runs, "duplicates") == 26
    files = sorted(Path(cfg.storage.examples_uri).rglob("*.parquet"))
    ex = pa.concat_tables([pq.read_table(f, partitioning=None) for f in files]).to_pandas()
    want = {json.loads(v)["event_id"]: json.loads(v)["label"] for _, v in good}
    assert len(ex) == 2_000 and all(want[e] == lab for e, lab in zip(ex.event_id, ex.label))
    why = reasons(dlq_records(kafka_config, cfg.kafka.dlq_topic))
    assert len(why) == 26 and all(w.startswith("duplicate") for w in why)


def test_a_context_key_named_like_a_feature_is_rejected_and_example_files_stay_readable(
    tmp_path, kafka_config, unique_topic
):
    from jobs.examples import ExampleStore

    cfg = job_config(tmp_path, kafka_config, unique_topic)
    good = good_events(1_000)
    ev = json.loads(good[10][1])
    clash = [
        (b"u3", json.dumps(dict(ev, event_id=f"c{i}", context={name: 0.99})).encode())
        for i, name in enumerate(["user_ctr_7d", "item_imp_all", "label", "kafka_offset", "context_ts"])
    ]
    with_ctx = [(k, json.dumps(dict(json.loads(v), context={"hour": 3})).encode()) for k, v in good[:100]]
    produce(kafka_config, unique_topic, with_ctx + clash + good[100:])
    runs = drain(cfg)
    assert total(runs, "accepted") == 1_000 and total(runs, "dead_lettered") == 5
    assert all("collides" in w for w in reasons(dlq_records(kafka_config, cfg.kafka.dlq_topic)))
    table = ExampleStore(cfg.storage.examples_uri).read_window()
    assert table.num_rows == 1_000 and len(set(table.column_names)) == len(table.column_names)
    assert np.isclose(table["user_ctr_7d"].to_numpy(), 0.99).sum() < 10  # the forged value is nowhere
