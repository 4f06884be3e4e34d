"""Replay a dataset into Kafka in event-time order, at full speed or N x real time.

Keys are user ids (so one user's events stay ordered within a partition);
values are the JSON wire format of :mod:`reloop.events`. The producer is
idempotent, so a broker hiccup and retry never duplicates an event.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pyarrow as pa

from reloop.config import KafkaConfig
from reloop.datasets import CORE_COLUMNS


class ReplayError(RuntimeError):
    """The replay could not deliver every event (the message says which and why)."""


@dataclass(frozen=True)
class ReplayStats:
    topic: str
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def parse_speed(speed: str) -> float | None:
    """``'max'`` -> None (no pacing); ``'3600x'`` -> 3600.0 (one hour of event time per second).

    >>> parse_speed("max"), parse_speed("60x"), parse_speed("2.5x")
    (None, 60.0, 2.5)
    """
    s = speed.strip().lower()
    if s == "max":
        return None
    try:
        factor = float(s[:-1] if s.endswith("x") else s)
    except ValueError:
        raise ReplayError(f"speed must be 'max' or 'Nx' (e.g. 3600x), got {speed!r}") from None
    if factor <= 0:
        raise ReplayError(f"speed must be positive, got {speed!r}")
    return factor


def encode_batch(batch: pa.RecordBatch) -> tuple[list[bytes], list[bytes]]:
    """(keys, values) of a batch of the event table, values in the wire format."""
    d = batch.to_pydict()
    context_cols = [c for c in batch.schema.names if c not in CORE_COLUMNS]
    keys = [u.encode() for u in d["user_id"]]
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    values = []
    for i in range(batch.num_rows):
        rec = {"event_id": d["event_id"][i], "ts": d["ts"][i], "user_id": d["user_id"][i],
               "item_id": d["item_id"][i], "label": d["label"][i]}
        if context_cols:
            rec["context"] = {c: d[c][i] for c in context_cols}
        values.append(dumps(rec).encode())
    return keys, values


def replay_table(table: pa.Table, cfg: KafkaConfig, *, topic: str | None = None, speed: float | None = None,
                 progress: bool = False, batch_size: int = 5000) -> ReplayStats:
    """Produce every row of an event table (already in time order) to ``topic``; wait for all acks."""
    from kafka.errors import KafkaError

    from reloop.kafka_io import ensure_topics, producer

    topic = topic or cfg.events_topic
    try:
        ensure_topics(cfg, [topic])
        prod = producer(cfg)
    except KafkaError as e:
        raise ReplayError(f"cannot reach Kafka at {cfg.bootstrap_servers}: {e} (is it up? `reloop up kafka`)") from e
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=table.num_rows, unit="ev", desc=f"replay -> {topic}", smoothing=0.1)
    failures: list[Exception] = []
    t0 = time.perf_counter()
    ts0 = table["ts"][0].as_py() if table.num_rows else 0
    try:
        for batch in table.to_batches(batch_size):
            keys, values = encode_batch(batch)
            if speed is None:
                for k, v in zip(keys, values):
                    prod.send(topic, key=k, value=v).add_errback(failures.append)
            else:
                ts = batch.column("ts").to_pylist()
                for k, v, t in zip(keys, values, ts):
                    wait = (t - ts0) / 1000.0 / speed - (time.perf_counter() - t0)
                    if wait > 0:
                        prod.flush() if wait > 0.05 else None
                        time.sleep(max(0.0, (t - ts0) / 1000.0 / speed - (time.perf_counter() - t0)))
                    prod.send(topic, key=k, value=v).add_errback(failures.append)
            if failures:
                break
            if bar is not None:
                bar.update(batch.num_rows)
        prod.flush()
    finally:
        prod.close()
        if bar is not None:
            bar.close()
    if failures:
        raise ReplayError(f"{len(failures)} event(s) were not delivered to {topic}: {failures[0]!r}")
    return ReplayStats(topic, table.num_rows, time.perf_counter() - t0)
