"""Replay a dataset into Kafka in event-time order, at full speed or N x real time.

Keys are user ids (so one user's events stay ordered within a partition);
values are the JSON wire format of :mod:`pipelines.events`. The producer is
idempotent, so a broker hiccup and retry never duplicates an event.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from kafka.errors import KafkaError
from tqdm import tqdm

from online_models.errors import ReloopError
from pipelines.config import KafkaConfig
from pipelines.kafka_io import ensure_topics, key_partition, partition_count, producer
from reloop.datasets import CORE_COLUMNS
from reloop.synthetic import FEEDBACK_COLUMNS, IMPRESSION_COLUMNS, SyntheticError
from reloop.synthetic import label_delay as split


class ReplayError(ReloopError, RuntimeError):
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


#: what a table holds: v1 labelled events, or the v2 impressions / feedback of a delayed stream
KINDS = ("event", "impression", "feedback")
#: the core (non-context) columns and the key column of each kind
_CORE = {
    "event": (CORE_COLUMNS, "user_id"),
    "impression": (IMPRESSION_COLUMNS, "user_id"),
    "feedback": (FEEDBACK_COLUMNS + ("value",), "impression_id"),
}


def encode_batch(batch: pa.RecordBatch, kind: str = "event") -> tuple[list[bytes], list[bytes]]:
    """(keys, values) of a batch of the event table, values in the wire format.

    ``kind`` ``impression`` / ``feedback``: a table of :func:`reloop.synthetic.split_delayed` (contract v2).
    """
    if kind != "event":
        return _encode_v2(batch, kind)
    d = batch.to_pydict()
    # columns named "__..." are the replay's own bookkeeping (the partition), never part of an event
    context_cols = [c for c in batch.schema.names if c not in CORE_COLUMNS and not c.startswith("__")]
    keys = [u.encode() for u in d["user_id"]]
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    values = []
    for i in range(batch.num_rows):
        rec = {
            "event_id": d["event_id"][i],
            "ts": d["ts"][i],
            "user_id": d["user_id"][i],
            "item_id": d["item_id"][i],
            "label": d["label"][i],
        }
        if context_cols:
            rec["context"] = {c: d[c][i] for c in context_cols}
        values.append(dumps(rec).encode())
    return keys, values


def _encode_v2(batch: pa.RecordBatch, kind: str) -> tuple[list[bytes], list[bytes]]:
    core, key = _CORE[kind]
    d = batch.to_pydict()
    context_cols = [c for c in batch.schema.names if c not in core and not c.startswith("__")]
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    present = [c for c in core if c in d]
    values = []
    for i in range(batch.num_rows):
        rec = {c: d[c][i] for c in present if d[c][i] is not None}
        if context_cols:
            rec["context"] = {c: d[c][i] for c in context_cols}
        values.append(dumps(rec).encode())
    return [k.encode() for k in d[key]], values


def partitions_for(keys: list[str], num_partitions: int) -> list[int]:
    """Kafka's default partition of each key (murmur2, as the Java client), hashed once per distinct key.

    >>> partitions_for(["196", "186", "22", "244", "196"], 4)
    [0, 0, 3, 2, 0]
    """

    cache: dict[str, int] = {}
    out = []
    for k in keys:
        p = cache.get(k)
        if p is None:
            p = cache[k] = key_partition(k, num_partitions)
        out.append(p)
    return out


def replay_table(
    table: pa.Table,
    cfg: KafkaConfig,
    *,
    topic: str | None = None,
    speed: float | None = None,
    progress: bool = False,
    batch_size: int = 5000,
    workers: int | None = None,
    kind: str = "event",
    ts0: int | None = None,
    t0: float | None = None,
) -> ReplayStats:
    """Produce every row of an event table (already in time order) to ``topic``; wait for all acks.

    Each event goes to its key's default partition (so consumers see one user's events in order).
    ``workers`` producer processes (default: 2 at full speed on >= 20k events, else 1) each own a
    disjoint set of partitions and send them in time order; pacing (``speed``) is against one shared
    start time, so N x real time holds across workers. ``kind``: see :func:`encode_batch`; ``ts0``/``t0``
    (event time and wall clock of the pacing origin) let two streams replayed side by side share one clock.
    """

    topic = topic or cfg.events_topic
    try:
        ensure_topics(cfg, [topic])
        num_partitions = partition_count(cfg, topic)
    except KafkaError as e:
        raise ReplayError(f"cannot reach Kafka at {cfg.bootstrap_servers}: {e} (is it up? `reloop up kafka`)") from e
    if workers is None:
        workers = 2 if speed is None and table.num_rows >= 20_000 else 1
    workers = max(1, min(workers, num_partitions))
    if kind not in KINDS:
        raise ReplayError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    parts = pa.array(partitions_for(table[_CORE[kind][1]].to_pylist(), num_partitions), pa.int32())
    table = table.append_column("__partition", parts)
    if ts0 is None:
        ts0 = table["ts"][0].as_py() if table.num_rows else 0
    t0 = time.time() if t0 is None else t0
    bar = None
    if progress:
        bar = tqdm(total=table.num_rows, unit="ev", desc=f"replay -> {topic}", smoothing=0.1)
    if workers == 1:
        _produce(table, cfg, topic, speed, ts0, t0, batch_size, bar.update if bar else None, kind=kind)
    else:
        _produce_parallel(table, cfg, topic, speed, ts0, t0, batch_size, workers, bar, kind)
    if bar is not None:
        bar.close()
    return ReplayStats(topic, table.num_rows, time.time() - t0)


def _produce(
    table: pa.Table,
    cfg: KafkaConfig,
    topic: str,
    speed: float | None,
    ts0: int,
    t0: float,
    batch_size: int,
    on_batch=None,
    ready=None,
    kind: str = "event",
) -> None:
    """One producer sending ``table`` in order (explicit partitions), pacing against wall-clock ``t0``.

    ``ready()`` is called once the producer knows the topic's partitions, right before the first send.
    """

    prod = producer(cfg)
    failures: list[Exception] = []
    try:
        prod.partitions_for(topic)  # connect and fetch metadata now, not on the first send
        if ready is not None:
            ready()
        for batch in table.to_batches(batch_size):
            keys, values = encode_batch(batch, kind)
            partitions = batch.column("__partition").to_pylist()
            send = prod.send
            if speed is None:
                for k, v, p in zip(keys, values, partitions):
                    send(topic, key=k, value=v, partition=p).add_errback(failures.append)
            else:
                for k, v, p, t in zip(keys, values, partitions, batch.column("ts").to_pylist()):
                    wait = (t - ts0) / 1000.0 / speed - (time.time() - t0)
                    if wait > 0.05:
                        prod.flush()  # deliver what is due before sleeping
                    if wait > 0:
                        time.sleep(max(0.0, (t - ts0) / 1000.0 / speed - (time.time() - t0)))
                    send(topic, key=k, value=v, partition=p).add_errback(failures.append)
            if failures:
                break
            if on_batch is not None:
                on_batch(batch.num_rows)
        prod.flush()
    finally:
        prod.close()
    if failures:
        raise ReplayError(f"{len(failures)} event(s) were not delivered to {topic}: {failures[0]!r}")


def _worker(
    ipc: bytes, cfg_json: str, topic: str, speed, ts0: int, t0: float, batch_size: int, done, start, kind: str = "event"
) -> None:
    table = pa.ipc.open_stream(ipc).read_all()

    def tick(n: int) -> None:
        with done.get_lock():
            done.value += n

    def ready() -> None:
        start.wait(timeout=120)  # every worker sends its first event at the same moment

    try:
        _produce(table, KafkaConfig.model_validate_json(cfg_json), topic, speed, ts0, t0, batch_size, tick, ready, kind)
    except BaseException:
        start.abort()  # the other workers stop waiting for this one
        raise


def _produce_parallel(
    table: pa.Table,
    cfg: KafkaConfig,
    topic: str,
    speed,
    ts0: int,
    t0: float,
    batch_size: int,
    workers: int,
    bar,
    kind: str = "event",
) -> None:

    owner = table["__partition"].to_numpy() % workers  # worker w owns partitions p with p % workers == w
    ctx = mp.get_context("spawn")  # no fork: the parent may hold client threads
    done = ctx.Value("q", 0)
    # all workers start sending together: at full speed a worker that started a second late would leave its
    # partitions empty while the others fill months of event time, and a feature job reading then would
    # judge those partitions idle and drop their events as late
    start = ctx.Barrier(workers)
    procs = []
    for w in range(workers):
        part = table.filter(pa.array(owner == w))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        proc = ctx.Process(
            target=_worker,
            args=(
                sink.getvalue().to_pybytes(),
                cfg.model_dump_json(),
                topic,
                speed,
                ts0,
                t0,
                batch_size,
                done,
                start,
                kind,
            ),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    shown = 0
    while any(p.is_alive() for p in procs):
        time.sleep(0.2)
        if bar is not None and done.value > shown:
            bar.update(done.value - shown)
            shown = done.value
    if bar is not None and done.value > shown:
        bar.update(done.value - shown)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise ReplayError(
            f"{len(bad)} of {workers} producer process(es) failed (exit codes {bad}); "
            f"{done.value} of {table.num_rows} events were acknowledged"
        )


@dataclass(frozen=True)
class DelayedReplayStats:
    impressions: ReplayStats
    feedback: ReplayStats


def _replay_slices(
    imps: pa.Table,
    fb: pa.Table,
    cfg: KafkaConfig,
    it: str,
    ft: str,
    slice_events: int,
    progress: bool,
    workers: int | None,
) -> DelayedReplayStats:
    """Full speed, both topics advancing together: slice by slice of event time (see :func:`replay_delayed`)."""
    t0 = time.time()
    its, fts = imps["ts"].to_numpy(), fb["ts"].to_numpy()
    n_imp = n_fb = 0
    lo_f = 0
    for lo in range(0, max(len(its), 1), max(1, slice_events)):
        hi = min(len(its), lo + slice_events)
        # the clicks up to the next slice's first impression (all of them after the last slice)
        hi_f = len(fts) if hi >= len(its) else int(np.searchsorted(fts, its[hi], side="left"))
        if hi > lo:
            n_imp += replay_table(
                imps.slice(lo, hi - lo), cfg, topic=it, workers=workers or 1, kind="impression"
            ).events
        if hi_f > lo_f:
            n_fb += replay_table(
                fb.slice(lo_f, hi_f - lo_f), cfg, topic=ft, workers=workers or 1, kind="feedback"
            ).events
        lo_f = hi_f
        if progress:
            print(f"\rreplay -> {it} + {ft}: {n_imp:,} impressions, {n_fb:,} clicks", end="", flush=True)
    if progress:
        print(flush=True)
    seconds = time.time() - t0
    return DelayedReplayStats(ReplayStats(it, n_imp, seconds), ReplayStats(ft, n_fb, seconds))


def replay_delayed(
    table: pa.Table,
    cfg: KafkaConfig,
    label_delay: str,
    *,
    seed: int = 0,
    impressions_topic: str | None = None,
    feedback_topic: str | None = None,
    speed: float | None = None,
    progress: bool = False,
    workers: int | None = None,
    slice_events: int = 5000,
    skip: tuple[set[str], set[str]] | None = None,
) -> DelayedReplayStats:
    """Replay a labelled table as contract v2: impressions, and clicks ``label_delay`` later (seeded).

    At full speed the two streams go out in event-time slices of ``slice_events`` impressions, each slice's
    impressions and then the clicks of the same time span, so neither topic runs far ahead of the other: a
    feature job reading while the replay runs sees them advance together, as in production (had all the
    impressions gone first, a join reading then would close their windows before any click existed).
    Paced, both streams are sent side by side against one clock, so a click reaches Kafka about its delay
    (divided by the speed) after its impression. ``skip``: impression ids already on each topic (a resumed
    run sends only the rest; the split is seeded, so it is the same split).
    """

    try:
        imps, fb = split(table, label_delay, seed)
    except SyntheticError as e:
        raise ReplayError(str(e)) from None
    if skip is not None:
        imps = imps.filter(pa.array([i not in skip[0] for i in imps["impression_id"].to_pylist()], pa.bool_()))
        fb = fb.filter(pa.array([i not in skip[1] for i in fb["impression_id"].to_pylist()], pa.bool_()))
    it = impressions_topic or cfg.impressions_topic
    ft = feedback_topic or cfg.feedback_topic
    if speed is None:
        return _replay_slices(imps, fb, cfg, it, ft, slice_events, progress, workers)

    ts0 = imps["ts"][0].as_py() if imps.num_rows else 0
    t0 = time.time()
    out: dict[str, object] = {}

    def send(name: str, t: pa.Table, topic: str, kind: str) -> None:
        try:
            out[name] = replay_table(t, cfg, topic=topic, speed=speed, workers=1, kind=kind, ts0=ts0, t0=t0)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            out[name] = e

    threads = [
        threading.Thread(target=send, args=("impressions", imps, it, "impression")),
        threading.Thread(target=send, args=("feedback", fb, ft, "feedback")),
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for v in out.values():
        if isinstance(v, BaseException):
            raise v
    return DelayedReplayStats(out["impressions"], out["feedback"])  # type: ignore[arg-type]
