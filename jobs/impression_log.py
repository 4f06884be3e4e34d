"""The scoring service's impression log: served candidates and accepted outcomes as contract-v2 records on Kafka.

``POST /score`` issues one impression id per candidate and ``POST /feedback`` admits outcomes through the
feedback guard; this log publishes what happened, so the feature job's attribution join
(:mod:`pipelines.join`) learns from served traffic:

- every scored candidate -> an ``impression`` (``impression_id, ts, user_id, item_id, request_id,
  position, context``) on ``kafka.impressions_topic``, key = user id; ``position`` is the candidate's rank
  in the answer (0 = top), ``ts`` the scoring time (epoch ms);
- every *accepted* positive outcome (``label`` 1) -> a ``feedback`` ``click`` on ``kafka.feedback_topic``,
  key = impression id, stamped no earlier than its impression. A label 0 publishes nothing: in contract v2 a
  negative is the absence of a click, emitted by the join when the attribution window closes (it is counted
  here as ``negatives_not_logged``). Refused outcomes (unknown, duplicate, over a cap) publish nothing.

Every record is encoded and then checked with the feature job's own parsers
(:func:`pipelines.events.parse_impression`, :func:`~pipelines.events.parse_feedback`) before it is sent, so
the service writes exactly what the join accepts; a record they refuse is counted (``invalid``), never sent.

**Never in the request's way.** A request only appends to a bounded queue (``max_queued`` records); a
sender thread builds, validates and hands records to an idempotent kafka-python producer, which it creates
(and re-creates) itself, so a broker that is down at start-up or goes away later never blocks or fails
``/score``. At most ``max_in_flight`` records wait for the broker's acknowledgement; beyond either bound a
record is dropped and counted (``dropped``); a send the producer gives up on (``delivery_timeout_ms``) is
counted as ``failed``. :meth:`ImpressionLog.health` (in ``GET /health``) shows all the counters and the last
error.

>>> log = ImpressionLog(None, ImpressionLogConfig(impressions_topic="imp", max_queued=2), start=False)
>>> log.impressions(1_700_000_000_000, "u1", "r1", [("r1.0", "i1", 0), ("r1.1", "i2", 1), ("r1.2", "i3", 2)], {})
False
>>> log.health()["dropped"], log.health()["queued"]
(3, 0)
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.config import KafkaConfig
from pipelines.events import Feedback, Impression, Rejection, parse_feedback, parse_impression
from pipelines.kafka_io import ensure_topics, producer

log = logging.getLogger("reloop.serve.impressions")

__all__ = ["ImpressionLogConfig", "ImpressionLog"]


@dataclass(frozen=True)
class ImpressionLogConfig:
    """The log's whole configuration; a topic of None is not logged."""

    impressions_topic: str | None = None
    feedback_topic: str | None = None
    max_queued: int = 200_000  # records waiting for the sender thread (a 1,000-candidate slate is 1,000)
    max_in_flight: int = 200_000  # records handed to the producer and not yet acknowledged or failed
    delivery_timeout_ms: int = 30_000  # how long the producer retries a record before it counts as failed
    max_block_ms: int = 5_000  # the sender thread's wait for metadata (never a request's)
    retry_s: float = 2.0  # between attempts to create the producer while the broker is down

    def __post_init__(self) -> None:
        if min(self.max_queued, self.max_in_flight) < 1:
            raise ValueError("max_queued and max_in_flight must be >= 1")
        if self.retry_s <= 0 or self.delivery_timeout_ms <= 0 or self.max_block_ms < 0:
            raise ValueError("retry_s and delivery_timeout_ms must be > 0, max_block_ms >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.impressions_topic or self.feedback_topic)


# one queued entry: ("imp", ts, user_id, request_id, [(impression_id, item_id, position)], context)
# or ("fb", ts, impression_id, kind, value)
_Entry = tuple


class ImpressionLog:
    """Publish impressions and accepted feedback without ever blocking the caller (see the module docstring)."""

    def __init__(
        self,
        kafka: KafkaConfig | None,
        config: ImpressionLogConfig = ImpressionLogConfig(),
        producer_factory: Callable[[], Any] | None = None,
        start: bool = True,
    ) -> None:
        self.kafka = kafka
        self.config = config
        self._factory = producer_factory or self._default_producer
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued = 0  # records (not entries) in the queue
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._producer: Any = None
        self._connecting = False
        self.stats: collections.Counter = collections.Counter()
        self.last_error: str | None = None
        self.last_invalid: str | None = None
        self._thread: threading.Thread | None = None
        if start and config.enabled:
            self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)
            self._thread.start()

    # ---- the request side: O(1), never blocks on Kafka -----------------------------------------------
    def impressions(
        self, ts: int, user_id: str, request_id: str | None, rows: list[tuple[str, str, int]], context: dict[str, Any]
    ) -> bool:
        """Queue one request's impressions (``rows`` = (impression_id, item_id, position)); False if dropped."""
        if not self.config.impressions_topic:
            return False
        return self._put(("imp", int(ts), user_id, request_id, rows, dict(context)), len(rows))

    def feedback(self, impression_id: str, ts: int, kind: str = "click", value: float | None = None) -> bool:
        """Queue one accepted outcome; False if dropped (or the feedback stream is not logged)."""
        if not self.config.feedback_topic:
            return False
        return self._put(("fb", int(ts), impression_id, kind, value), 1)

    def negative(self) -> None:
        """Count an accepted label 0: contract v2 has no negative record (the join emits it at window close)."""
        with self._cond:
            self.stats["negatives_not_logged"] += 1

    def _put(self, entry: _Entry, n: int) -> bool:
        with self._cond:
            if self._queued + n > self.config.max_queued:
                self.stats["dropped"] += n
                return False
            self._queue.append(entry)
            self._queued += n
            self._cond.notify()
        return True

    def health(self) -> dict[str, Any]:
        """Counters for ``GET /health``: queued, in flight, sent, failed, dropped, invalid, and the last error.

        ``producer_created``: the broker was reachable once and a producer exists (it reconnects by itself);
        an outage after that shows as ``in_flight`` growing, then ``failed`` after ``delivery_timeout_ms``.
        """
        with self._cond:
            queued, in_flight = self._queued, self._in_flight
        keys = ("impressions_sent", "feedback_sent", "failed", "dropped", "invalid", "negatives_not_logged")
        return {
            "impressions_topic": self.config.impressions_topic,
            "feedback_topic": self.config.feedback_topic,
            "producer_created": self._producer is not None,
            "connecting": self._connecting,
            "connect_failures": int(self.stats["connect_failures"]),
            "queued": queued,
            "in_flight": in_flight,
            **{k: int(self.stats[k]) for k in keys},
            "last_error": self.last_error,
            "last_invalid": self.last_invalid,
        }

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued was acknowledged or failed (tests, shutdown); True if it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to ``timeout``), then stop the sender and close the producer."""
        if self._thread is not None:
            self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout + 5)
        if self._producer is not None:
            try:
                self._producer.close(timeout=timeout)
            except Exception:  # noqa: BLE001  (closing must not raise on a broken connection)
                pass
            self._producer = None

    # ---- the sender thread ----------------------------------------------------------------------------
    def _default_producer(self) -> Any:

        assert self.kafka is not None, "no Kafka config"
        c = self.config
        # the producer first: its bootstrap gives up after max_block_ms when the broker is down
        prod = producer(
            self.kafka,
            max_block_ms=c.max_block_ms,
            delivery_timeout_ms=c.delivery_timeout_ms,
            request_timeout_ms=min(10_000, c.delivery_timeout_ms),
            bootstrap_timeout_ms=c.max_block_ms,
        )
        try:  # with the configured partitions, not the broker's auto-create default
            ensure_topics(self.kafka, [t for t in (c.impressions_topic, c.feedback_topic) if t])
        except Exception:
            prod.close(timeout=1)
            raise
        return prod

    def _connect(self) -> bool:
        self._connecting = True
        try:
            self._producer = self._factory()
            self.last_error = None
            return True
        except Exception as e:  # noqa: BLE001  (NoBrokersAvailable, KafkaError, OSError: retried later)
            self.last_error = f"cannot create the Kafka producer: {type(e).__name__}: {e}"
            self.stats["connect_failures"] += 1
            return False
        finally:
            self._connecting = False

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._producer is None and not self._connect():
                self._stop.wait(self.config.retry_s)  # meanwhile requests fill the bounded queue, then drop
                continue
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                batch = list(self._queue)
                self._queue.clear()
            for entry in batch:
                try:
                    self._send_entry(entry)
                except Exception as e:  # noqa: BLE001  (the thread must survive anything a record does)
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.exception("impression log: unexpected error")
                finally:
                    with self._cond:
                        self._queued -= len(entry[4]) if entry[0] == "imp" else 1
                        self._cond.notify_all()

    def _records(self, entry: _Entry) -> list[tuple[str, bytes, bytes, str]]:
        """(topic, key, value, stat) of an entry's records, each checked with the feature job's parser."""
        out = []
        if entry[0] == "imp":
            _, ts, user, rid, rows, context = entry
            for iid, item, pos in rows:
                raw = Impression(iid, ts, user, item, rid, pos, context).to_json()
                if self._valid(parse_impression(raw)):
                    out.append((self.config.impressions_topic, user.encode(), raw, "impressions_sent"))
        else:
            _, ts, iid, kind, value = entry
            raw = Feedback(iid, ts, kind, value).to_json()
            if self._valid(parse_feedback(raw)):
                out.append((self.config.feedback_topic, iid.encode(), raw, "feedback_sent"))
        return out

    def _valid(self, parsed: Any) -> bool:
        if isinstance(parsed, Rejection):
            self.stats["invalid"] += 1
            self.last_invalid = parsed.reason
            return False
        return True

    def _send_entry(self, entry: _Entry) -> None:
        try:
            records = self._records(entry)
        except (UnicodeEncodeError, ValueError, TypeError) as e:  # e.g. a lone surrogate in a key
            self.stats["invalid"] += len(entry[4]) if entry[0] == "imp" else 1
            self.last_invalid = f"{type(e).__name__}: {e}"
            return
        for topic, key, value, stat in records:
            with self._cond:
                if self._in_flight >= self.config.max_in_flight:
                    self.stats["dropped"] += 1
                    continue
                self._in_flight += 1
            try:
                future = self._producer.send(topic, key=key, value=value)
            except Exception as e:  # noqa: BLE001  (metadata timeout, closed producer, ...)
                self._done(False, stat, e)
                continue
            future.add_callback(lambda _md, s=stat: self._done(True, s))
            future.add_errback(lambda e, s=stat: self._done(False, s, e))

    def _done(self, ok: bool, stat: str, error: BaseException | None = None) -> None:
        with self._cond:
            self._in_flight -= 1
            self.stats[stat if ok else "failed"] += 1
            if error is not None:
                self.last_error = f"send failed: {type(error).__name__}: {error}"
            self._cond.notify_all()
