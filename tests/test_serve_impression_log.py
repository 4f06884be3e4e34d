"""The impression log's bookkeeping without a broker (a producer double that acknowledges on demand): the
bounds on queued and in-flight records, failed sends, records the v2 parsers refuse, and retries while
the producer cannot be created. The real broker and join are in ``tests/test_serve_impressions.py``."""

from __future__ import annotations

import json
import threading
import time

from jobs.impression_log import ImpressionLog, ImpressionLogConfig


class Future:
    def __init__(self) -> None:
        self.ok: list = []
        self.err: list = []

    def add_callback(self, f):
        self.ok.append(f)
        return self

    def add_errback(self, f):
        self.err.append(f)
        return self


class Producer:
    """Records what is sent; the test decides when each send succeeds or fails."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, Future]] = []
        self.lock = threading.Lock()

    def send(self, topic, key=None, value=None):
        f = Future()
        with self.lock:
            self.sent.append((topic, key, value, f))
        return f

    def close(self, timeout=None):
        pass


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_records_are_acknowledged_failed_or_dropped_and_counted():
    prod = Producer()
    log = ImpressionLog(None, ImpressionLogConfig("imp", "fb", max_in_flight=3), producer_factory=lambda: prod)
    try:
        rows = [(f"r.{i}", f"item{i}", i) for i in range(5)]
        assert log.impressions(10, "u1", "r", rows, {"device": "web"})
        assert log.feedback("r.0", 12)
        wait_for(lambda: log.health()["queued"] == 0)
        h = log.health()
        assert len(prod.sent) == 3 and h["in_flight"] == 3 and h["dropped"] == 3  # 6 records, 3 in flight
        assert [json.loads(v)["position"] for _, _, v, _ in prod.sent] == [0, 1, 2]
        assert {(t, k) for t, k, _, _ in prod.sent} == {("imp", b"u1")}
        prod.sent[0][3].ok[0](None)
        prod.sent[1][3].err[0](RuntimeError("broker gone"))
        h = log.health()
        assert h["impressions_sent"] == 1 and h["failed"] == 1 and "broker gone" in h["last_error"]
        assert h["in_flight"] == 1 and not log.flush(0.1)
        prod.sent[2][3].ok[0](None)
        assert log.flush(1)
        log.feedback("r.3", 20)
        log.negative()
        wait_for(lambda: len(prod.sent) == 4)
        topic, key, value, fut = prod.sent[3]
        assert (topic, key, json.loads(value)) == ("fb", b"r.3", {"impression_id": "r.3", "ts": 20, "kind": "click"})
        fut.ok[0](None)
        assert log.health()["feedback_sent"] == 1 and log.health()["negatives_not_logged"] == 1
    finally:
        log.close(timeout=1)


def test_records_the_v2_parsers_refuse_are_counted_never_sent():
    prod = Producer()
    log = ImpressionLog(None, ImpressionLogConfig("imp", "fb"), producer_factory=lambda: prod)
    try:
        log.impressions(10, "u1", "r", [("r.0", "i", 0)], {"user_ctr_7d": 0.9})  # a pipeline column
        log.impressions(10, "u1", "r", [("r.1", "i", 20_000)], {})  # beyond the largest slate
        log.feedback("r.0", -5)  # not an epoch time
        wait_for(lambda: log.health()["invalid"] == 3)
        assert prod.sent == [] and "ts" in log.health()["last_invalid"]
    finally:
        log.close(timeout=1)


def test_the_producer_is_retried_until_it_can_be_created_and_the_queue_is_bounded_meanwhile():
    attempts = []
    prod = Producer()

    def factory():
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("no broker")
        return prod

    log = ImpressionLog(None, ImpressionLogConfig("imp", None, max_queued=4, retry_s=0.5), producer_factory=factory)
    try:
        t0 = time.perf_counter()
        accepted = [log.impressions(1, "u", None, [(f"x.{k}", "i", 0)], {}) for k in range(10)]
        assert time.perf_counter() - t0 < 0.1  # the caller never waits for the producer
        assert not log.feedback("x.0", 2)  # the feedback stream is not logged
        wait_for(lambda: len(prod.sent) >= sum(accepted))
        h = log.health()
        assert h["connect_failures"] == 2 and h["producer_created"] and h["dropped"] == 10 - sum(accepted) >= 6
    finally:
        log.close(timeout=1)


def test_the_service_flags_name_the_topics_or_take_the_configs():
    from jobs.serve import impression_log
    from pipelines.config import KafkaConfig

    k = KafkaConfig(bootstrap_servers="127.0.0.1:1", impressions_topic="cfg.imp", feedback_topic="cfg.fb")
    assert impression_log(k, None, None) is None  # no flag: no log
    both = impression_log(k, "", "", retry_s=60, max_block_ms=100)  # bare flags: the config's topics
    only = impression_log(k, "my.imp", None, retry_s=60, max_block_ms=100)
    try:
        assert (both.config.impressions_topic, both.config.feedback_topic) == ("cfg.imp", "cfg.fb")
        assert (only.config.impressions_topic, only.config.feedback_topic) == ("my.imp", None)
    finally:
        both.close(timeout=0.1)
        only.close(timeout=0.1)
