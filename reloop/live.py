"""The served side of ``reloop run``: score every new example with the current model and the memory,
learn from its label at once, watch the stream with the drift monitors, and act on their requests.

For each new training example (its features are the online features as they
stood strictly before the event, exactly what the scoring service reads from
Feast at request time) the loop:

1. scores it with the registry's current version: base probability and the
   model's hidden layer (the memory's key), then the compensated probability
   from the error-compensation memory;
2. writes the outcome into the memory (the label arrives: ``/feedback``);
3. feeds the base model's labelled prediction to the drift monitors; the
   policy's requests are delivered through the alert hooks and carried out by
   :class:`Deployer` (retrain -> gate -> promote, or rollback).

When the current version changes the loop swaps the model between two
batches (no request is ever scored by half a model) and rebuilds the memory
from a bounded buffer of recent outcomes, since the new model's hidden space
differs. Everything here is in-process and single-threaded by design; the
run loop drives it from one thread.


The trace keeps what serving did, event by event, for the report and the gate:

>>> import numpy as np, pyarrow as pa
>>> t = Trace()
>>> rows = pa.table({"ts": [1, 2], "label": [0, 1], "user_id": ["u", "v"], "event_id": ["a", "b"]})
>>> t.add(rows, np.array([.2, .7]), np.array([.25, .8]), version="v000001", horizon=0)
>>> a = t.arrays()
>>> a["p_mem"].tolist(), list(a["version"])
([0.25, 0.8], ['v000001', 'v000001'])
"""

from __future__ import annotations

import collections
import json
import math
import threading
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _encode_str
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.examples import ExampleStore, Position
from jobs.registry import ModelRegistry
from jobs.scoring import (
    Bundle,
    base_predictions,
    check_causal,
    horizon_of,
    load_bundle,
    rebuild_memory,
    score_rows,
    serve_timeline,
)
from online_models.metrics import auc, logloss
from pipelines.kafka_io import key_partition, producer
from pipelines.side_features import SideTableSource

_TRACE_COLUMNS = (
    ("ts", np.int64),
    ("y", np.float64),
    ("p_base", np.float64),
    ("p_mem", np.float64),
    ("p_prev", np.float64),
    ("user", object),
    ("event_id", object),
    ("version", object),
    ("horizon", np.int64),
    ("label_ts", np.int64),
)


@dataclass
class Trace:
    """Everything scored so far, in arrival order (what the report draws).

    The live thread adds while the progress display, the gate and the deployer read from theirs: both
    hold ``lock``, or a merge could drop a chunk added meanwhile and leave the columns unequal.
    """

    ts: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    p_base: list[np.ndarray] = field(default_factory=list)
    p_mem: list[np.ndarray] = field(default_factory=list)
    p_prev: list[np.ndarray] = field(default_factory=list)  # the previous version's shadow (NaN: none)
    user: list[np.ndarray] = field(default_factory=list)
    event_id: list[np.ndarray] = field(default_factory=list)
    version: list[np.ndarray] = field(default_factory=list)  # the version that served each event
    horizon: list[np.ndarray] = field(default_factory=list)  # its trained_until_ts (ms)
    label_ts: list[np.ndarray] = field(default_factory=list)  # when each label arrived (= ts without delay)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    #: the row where each version first appears: every row it served is at or after it (what the gate scans)
    first_rows: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    #: the columns as growing buffers (the chunk lists above hold what was added since the last arrays())
    _buffers: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    _filled: int = 0

    def add(
        self,
        table: pa.Table,
        p_base: np.ndarray,
        p_mem: np.ndarray,
        p_prev: np.ndarray | None = None,
        version: str = "",
        horizon: int | None = None,
    ) -> None:
        cols = (
            table["ts"].to_numpy(),
            table["label"].to_numpy().astype(np.float64),
            table["user_id"].to_numpy(zero_copy_only=False).astype(object),
            table["event_id"].to_numpy(zero_copy_only=False).astype(object),
            table["label_ts" if "label_ts" in table.column_names else "ts"].to_numpy(),
        )
        with self.lock:
            for chunks, values in zip((self.ts, self.y, self.user, self.event_id, self.label_ts), cols):
                chunks.append(values)
            self.p_base.append(p_base)
            self.p_mem.append(p_mem)
            self.p_prev.append(np.full(len(p_base), np.nan) if p_prev is None else p_prev)
            self.version.append(np.full(len(p_base), version, object))
            # the rows before this chunk: those merged into the buffers and those still in chunks
            self.first_rows.setdefault(version, self._filled + sum(len(c) for c in self.version[:-1]))
            self.horizon.append(np.full(len(p_base), -1 if horizon is None else horizon, np.int64))

    def reindex(self) -> None:
        """Recount each version's first row after the columns were set whole (a resumed run)."""
        names, first = np.unique(self.arrays()["version"], return_index=True)
        with self.lock:
            self.first_rows = {str(v): int(i) for v, i in zip(names, first)}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column as one array (views of the rows so far: later rows never change them).

        The chunks added since the last call are copied into a buffer per column whose capacity doubles, so
        the progress display, the gate and the deployer, which ask often, pay for what arrived since, not for
        the whole trace (merging every chunk into one array again was O(rows) per call: 4 s of a 300k run's
        gates).
        """
        out = {}
        with self.lock:
            added = sum(len(c) for c in self.ts)
            filled = self._filled + added
            for name, dtype in _TRACE_COLUMNS:
                chunks = getattr(self, name)
                buf = self._buffers.get(name)
                if chunks:
                    if buf is None or len(buf) < filled:
                        grown = np.empty(max(filled, 2 * (0 if buf is None else len(buf)), 1024), dtype)
                        if buf is not None:
                            grown[: self._filled] = buf[: self._filled]
                        buf = self._buffers[name] = grown
                    at = self._filled
                    for c in chunks:
                        buf[at : at + len(c)] = c
                        at += len(c)
                    chunks.clear()
                out[name] = buf[:filled] if buf is not None else np.zeros(0, dtype)
            self._filled = filled
        return out

    def promotions(self, versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """After each model swap: the new model against the previous one (its shadow) on the same events."""

        a = self.arrays()
        out = []
        starts = [v["at_event"] for v in versions] + [len(a["y"])]
        for v, lo, hi in zip(versions, starts, starts[1:]):
            y, new, old = a["y"][lo:hi], a["p_base"][lo:hi], a["p_prev"][lo:hi]
            ok = ~np.isnan(old)
            if v.get("previous") is None or ok.sum() < 50 or not 0 < y[ok].sum() < ok.sum():
                continue
            out.append(
                {
                    "version": v["version"],
                    "previous": v["previous"],
                    "reason": v["reason"],
                    "ts": v["ts"],
                    "n": int(ok.sum()),
                    "auc_new": round(auc(y[ok], new[ok]), 6),
                    "auc_previous": round(auc(y[ok], old[ok]), 6),
                    "logloss_new": round(logloss(y[ok], new[ok]), 6),
                    "logloss_previous": round(logloss(y[ok], old[ok]), 6),
                }
            )
        return out

    def last(self, n: int) -> dict[str, np.ndarray]:
        """The last ``n`` scored events (the gate's holdout)."""
        a = self.arrays()
        return {k: v[-n:] for k, v in a.items()}


class ServingLoop:
    """Score -> compensate -> learn-from-feedback -> monitor, over the example store (see the module doc).

    ``monitor`` is a :class:`jobs.monitor.MonitorLoop` (monitors, policy, hooks, actions); it sees the base
    model's prediction (retraining is about the base model; the memory would mask its decay) and, during a
    rollback watch, the previous model's shadow prediction on the same events.
    """

    def __init__(
        self,
        examples_uri: str,
        registry: ModelRegistry,
        memory_config: dict[str, Any],
        monitor=None,
        buffer_rows: int = 20_000,
        batch_size: int = 512,
        shadow_events: int = 20_000,
        causal: bool = True,
        side: SideTableSource | None = None,
    ) -> None:
        # side: the side tables joined point in time onto every example scored (reloop run --side-features)
        self.store = ExampleStore(examples_uri, side=side)
        self.position = Position()
        self.registry = registry
        self.memory_config = dict(memory_config)
        self.monitor = monitor
        self.buffer: collections.deque[pa.Table] = collections.deque()
        self.buffer_rows, self.batch_size, self.shadow_events = buffer_rows, batch_size, shadow_events
        self.served: Bundle | None = None
        #: the version that started the current lineage: refreshes of the same incremental model keep it, so
        #: the monitors are not rebased (and blinded) by every refresh; a retrain, rollback or bootstrap starts one
        self.lineage: str | None = None
        self.shadow: tuple[Bundle, int] | None = None  # the previous model, scored alongside for a while
        self.trace = Trace()
        self.unscored = 0  # examples that arrived before any model was current
        self.scored = 0
        self.versions: list[dict[str, Any]] = []
        self.last_ts = 0
        self.score_seconds = 0.0
        self.swap_seconds = 0.0  # looking for a new version, loading it and rebuilding its memory
        self.t0 = time.time()  # wall-clock origin of the wall_s stamps (the run sets its own)
        #: an event time to watch for (an injected shift): the wall-clock second its first event is scored
        self.mark_ts: int | None = None
        self.mark_wall_s: float | None = None
        self.mark_event: int | None = None
        #: examples the first served version was trained on (in store order): never scored, that would leak
        self.skip = 0
        #: enforce the causal clock (see :meth:`maybe_swap`); a violation raises CausalityError
        self.causal = causal
        #: the registry's current version, loaded, while it waits for the clock: (bundle, reason)
        self.waiting: tuple[Bundle, str] | None = None
        #: called with (rows, p_base, p_mem, p_prev, version) after each scored batch: the predictions log
        self.publish = None
        self.publish_errors = 0
        self.last_publish_error: str | None = None

    # -- model swaps ------------------------------------------------------------------------------
    def recent(self) -> pa.Table | None:
        """The bounded buffer of recent outcomes (what a new model's memory is rebuilt from)."""
        return pa.concat_tables(list(self.buffer)) if self.buffer else None

    def _pending_version(self) -> Bundle | None:
        """The registry's current version when it is not the one served (loaded once, kept until it serves)."""
        pointer = self.registry.pointer()
        current = pointer["version"] if pointer else None
        if current is None or (self.served is not None and self.served.version == current):
            self.waiting = None
            return None
        if self.waiting is None or self.waiting[0].version != current:
            self.waiting = (
                load_bundle(self.registry, current, self.memory_config),
                pointer.get("reason") or "promoted",
            )
        return self.waiting[0]

    def maybe_swap(self, next_ts: int | None = None) -> bool:
        """Serve the registry's current version from the next event on, if the clock allows it.

        One causal clock: a version may serve an event only if everything it learned has an earlier event
        time (``trained_until_ts`` < the event's ``ts``). A version whose horizon reaches ``next_ts`` (the
        first event of the next batch) waits: the one serving goes on until the stream has passed it.
        """
        t0 = time.perf_counter()
        try:
            return self._maybe_swap(next_ts)
        finally:
            self.swap_seconds += time.perf_counter() - t0

    def _maybe_swap(self, next_ts: int | None) -> bool:
        new = self._pending_version()
        if new is None:
            return False
        horizon = horizon_of(new.entry)
        if (
            self.causal
            and next_ts is not None
            and horizon is not None
            and next_ts <= horizon
            and self.served is not None
        ):
            return False  # not yet: it learned events at or after the next one to serve
        reason = self.waiting[1]
        self.waiting = None
        entry = new.entry
        rebuilt = rebuild_memory(new, self.recent())
        previous = self.served
        if previous is None or not reason.startswith("refresh"):
            self.lineage = new.version
        if previous is None and self.scored == 0:
            self.skip = max(0, int(entry.training_range.get("learned", 0)) - self.unscored)
        self.served = new
        self.shadow = (previous, self.scored) if previous is not None else None
        self.versions.append(
            {
                "ts": int(self.last_ts),
                "wall_s": round(time.time() - self.t0, 2),
                "version": new.version,
                "previous": previous.version if previous else None,
                "reason": reason,
                "lineage": self.lineage,
                "memory_rebuilt_from": rebuilt,
                "at_event": self.scored,
                "source": entry.extra.get("source"),
                "trained_until_ts": horizon,
                "first_served_ts": None,
                "served_events": 0,
            }
        )
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def step(self, max_batches: int | None = None, max_rows: int | None = None) -> int:
        """Process the examples that arrived since the last call (or ``max_batches`` of them).

        Before the first version is current nothing is consumed: the first model's own training examples
        are then passed over (buffered for the memory, not scored) and scoring starts right after them.
        ``max_rows`` bounds how far the loop may go in this call (the run keeps serving within a bounded lag
        of the trainer, as in real time, even when the replay runs at full speed).
        """
        if self.served is None and self._pending_version() is None:
            return 0
        done = 0
        size = self.batch_size if max_rows is None else max(0, min(self.batch_size, max_rows))
        if size == 0:
            return 0
        for i, (table, pos) in enumerate(self.store.batches(self.position, size)):
            self.maybe_swap(int(table["ts"].to_numpy().min()))
            self._process(table)
            self.position = pos
            done += table.num_rows
            if max_batches is not None and i + 1 >= max_batches:
                break
            if max_rows is not None and done + size > max_rows:
                break
        return done

    @property
    def passed(self) -> int:
        """Examples passed over so far in store order (scored or not): their labels have arrived."""
        return self.scored + self.unscored

    def has_pending(self) -> bool:
        """Examples in the store not yet served."""
        return bool(self.store.pending(self.position))

    def _process(self, table: pa.Table) -> None:
        if self.versions and not self.versions[-1]["ts"]:  # a version swapped in before any event: its start
            self.versions[-1]["ts"] = int(table["ts"].to_numpy().min())
        self.last_ts = int(table["ts"].to_numpy().max())
        self._remember(table)
        if self.skip:
            k = min(self.skip, table.num_rows)
            self.skip -= k
            self.unscored += k
            table = table.slice(k)
            if table.num_rows == 0:
                return
        horizon = horizon_of(self.served.entry)
        if self.causal and horizon is not None and self.scored == 0:
            # the first version has nothing older to hand over to: events of its own horizon's timestamp
            # (ties) are passed over unscored, like its warm-up
            k = int((table["ts"].to_numpy() <= horizon).sum()) if int(table["ts"].to_numpy().min()) <= horizon else 0
            if k:
                self.unscored += k
                table = table.slice(k)
                if table.num_rows == 0:
                    return
        if self.causal:
            check_causal(self.served, table["ts"].to_numpy())
        self._count_served(int(table["ts"].to_numpy().min()), table.num_rows)
        t0 = time.perf_counter()
        pb, pm = score_rows(self.served, table, learn=True)
        self.score_seconds += time.perf_counter() - t0
        prev = self._shadow_predictions(table)
        if self.mark_ts is not None and self.mark_wall_s is None and int(table["ts"].to_numpy().max()) >= self.mark_ts:
            self.mark_wall_s = round(time.time() - self.t0, 2)
            self.mark_event = self.scored + int((table["ts"].to_numpy() < self.mark_ts).sum())
        self.trace.add(table, pb, pm, prev, self.served.version, horizon)
        self.scored += table.num_rows
        self._deliver(table, pb, pm, prev, self.served.version)

    # -- what both loops do with a scored, labelled batch --------------------------------------------
    def _remember(self, table: pa.Table) -> None:
        """Keep labelled rows in the bounded buffer a new model's memory is rebuilt from."""
        self.buffer.append(table)
        while sum(t.num_rows for t in self.buffer) - self.buffer[0].num_rows >= self.buffer_rows:
            self.buffer.popleft()

    def _count_served(self, first_ts: int, n: int) -> None:
        """The serving version's record: its first served event time and how many events it served."""
        v = self.versions[-1] if self.versions else None
        if v is not None and v["version"] == self.served.version:
            if v["first_served_ts"] is None:
                v["first_served_ts"] = first_ts
            v["served_events"] += n

    def _shadow_predictions(self, table: pa.Table) -> np.ndarray | None:
        """The previous model's predictions of ``table`` for a while after a swap (None once it expired)."""
        if self.shadow is None:
            return None
        old, since = self.shadow
        if self.scored - since < self.shadow_events:
            return base_predictions(old, table)
        self.shadow = None
        return None

    def _deliver(self, table: pa.Table, pb: np.ndarray, pm: np.ndarray, prev: np.ndarray | None, version: str) -> None:
        """Labelled predictions to the predictions log and the drift monitors."""
        if self.publish is not None:
            try:
                self.publish(table, pb, pm, prev, version)
            except Exception as e:  # noqa: BLE001 - the log on Kafka is for outside readers; serving goes on
                self.publish_errors += 1
                self.last_publish_error = repr(e)
        if self.monitor is not None:
            self._monitor(table, pb, pm, prev)

    def _monitor(self, table: pa.Table, p_base: np.ndarray, p_mem: np.ndarray, p_prev: np.ndarray | None) -> None:
        # the base model's loss is what the monitors watch; the batch as arrays (what feeding it one
        # PredictionRecord per event gives, see MonitorLoop.process_batch)
        self.monitor.process_batch(
            table["ts"].to_numpy(), np.asarray(p_base, np.float64), table["label"].to_numpy(), self.lineage, p_prev
        )


class PredictionLog:
    """Publishes every scored event, with its label, on the predictions topic (``reloop monitor`` reads it).

    One JSON record per event (the format of :func:`jobs.monitor.parse_prediction`), keyed by user id;
    sent asynchronously, flushed on :meth:`close`. Each record is written from C-escaped strings and sent to its
    key's default partition computed once per user: ``json.dumps`` of a dict and kafka-python's pure-Python
    murmur2 per record took ~40 us of every event served.
    """

    def __init__(
        self, kafka_cfg, topic: str, run_id: str | None = None, features: tuple[str, ...] = (), *, client: Any = None
    ) -> None:
        """``client``: a KafkaProducer to send with (default: one of ``kafka_cfg``)."""
        self.topic, self.run_id, self.features = topic, run_id, features
        self.producer = client if client is not None else producer(kafka_cfg)
        self.sent = 0
        self._partitions: int | None = None
        self._partition_of: dict[str, int] = {}
        self._run = f', "run_id": {_json_str(run_id)}'

    def _partition(self, key: str) -> int:
        p = self._partition_of.get(key)
        if p is None:
            if len(self._partition_of) > 1_000_000:  # bounded: a stream of endless new users
                self._partition_of.clear()
            p = self._partition_of[key] = key_partition(key, self._partitions)
        return p

    def __call__(
        self, table: pa.Table, p_base: np.ndarray, p_mem: np.ndarray, p_prev: np.ndarray | None, version: str
    ) -> None:
        if self._partitions is None:
            self._partitions = len(self.producer.partitions_for(self.topic))
        ids, ts, users, items, labels = (
            table[c].to_pylist() for c in ("event_id", "ts", "user_id", "item_id", "label")
        )
        pm, pb = _json_probs(p_mem), _json_probs(p_base)
        prev = None if p_prev is None else _json_probs(p_prev)
        feats = {f: table[f].to_pylist() for f in self.features if f in table.column_names}
        head = f', "model_version": {_json_str(version)}'
        send, topic = self.producer.send, self.topic
        for j in range(table.num_rows):
            user = users[j]
            extra = f', "p_prev": {prev[j]}' if prev is not None and prev[j] != "null" else ""
            for f, vals in feats.items():
                if isinstance(vals[j], (int, float)) and np.isfinite(vals[j]):
                    extra += f", {_json_str(f)}: {json.dumps(vals[j])}"
            rec = (
                f'{{"event_id": {_json_str(ids[j])}, "ts": {int(ts[j])}, "user_id": {_json_str(user)}, '
                f'"item_id": {_json_str(items[j])}, "label": {int(labels[j])}, "p": {pm[j]}, "p_base": {pb[j]}'
                f"{head}{self._run}{extra}}}"
            )
            key = str(user)
            send(topic, key=key.encode(), value=rec.encode(), partition=self._partition(key))
        self.sent += table.num_rows

    def close(self) -> None:
        self.producer.flush(timeout=30)
        self.producer.close(timeout=10)


def _json_str(v: Any) -> str:
    """A JSON string (C-escaped: quotes, control characters and non-ASCII as json.dumps writes them), or null."""
    return "null" if v is None else _encode_str(str(v))


def _json_probs(p: np.ndarray) -> list[str]:
    """Probabilities rounded to 6 places as JSON numbers (``round``, as before), null where not finite."""
    return [repr(round(x, 6)) if math.isfinite(x) else "null" for x in np.asarray(p, np.float64).tolist()]


class DelayedServingLoop(ServingLoop):
    """The served side when labels arrive late (contract v2: impressions + clicks joined in a window).

    The example store then holds each impression once its label is known (a click within ``window_ms``,
    or the window's close: a negative), with ``label_ts``, in label order. Serving replays the two clocks
    of production in one event-time timeline: each impression is scored at its own ``ts`` with the memory
    as it stood then (every outcome with ``label_ts`` before it, none after), and its outcome is written
    into the memory at its ``label_ts`` (:func:`jobs.scoring.serve_timeline`). The monitors, the
    predictions log, the trace (what the gate and the report read) and the rebuild buffer see an outcome
    when it arrives, with the prediction served at impression time.

    An impression at ``t`` can be served once no later example can still precede it: the store is in
    label order, and a negative with ``label_ts = c`` means the join's watermark passed ``c``, so every
    example still to come has ``label_ts > c`` and ``ts > c - window_ms``. The timeline is processed up
    to that horizon (everything once ``final``: the feature job has emitted all it will). ``passed``, what
    the trainer may learn, is the store-order prefix whose outcomes have arrived on this timeline.
    """

    def __init__(
        self, examples_uri: str, registry: ModelRegistry, memory_config: dict[str, Any], *, window_ms: int, **kw: Any
    ) -> None:
        super().__init__(examples_uri, registry, memory_config, **kw)
        self.window_ms = int(window_ms)
        self.final = False  # set by the run once the feature job has emitted everything
        self.read = 0  # store rows read so far (their store-order sequence numbers)
        self.closed_until = -1  # the newest label_ts of a negative read: the join's watermark passed it
        self.warmup_until = -1  # the first version's horizon: impressions up to it are its warm-up, never scored
        self.clock = -1  # event time of the last timeline step processed
        self.open: pa.Table | None = None  # rows read whose impression or outcome step is still ahead
        self._state: dict[str, np.ndarray] = {}

    @property
    def passed(self) -> int:
        """The longest store-order prefix whose outcomes have arrived (what the trainer may learn)."""
        if self.open is None or not len(self._state.get("written", ())):
            return self.read
        waiting = ~self._state["written"]
        return int(self._state["seq"][waiting].min()) if waiting.any() else self.read

    def has_pending(self) -> bool:
        return bool(self.store.pending(self.position)) or (self.open is not None and self.open.num_rows > 0)

    def _take(self, table: pa.Table) -> None:
        n = table.num_rows
        seq = np.arange(self.read, self.read + n, dtype=np.int64)
        self.read += n
        neg = table["label"].to_numpy() == 0
        if neg.any():
            self.closed_until = max(self.closed_until, int(table["label_ts"].to_numpy()[neg].max()))
        new = {
            "seq": seq,
            "scored": np.zeros(n, bool),
            "written": np.zeros(n, bool),
            "p_base": np.full(n, np.nan),
            "p_mem": np.full(n, np.nan),
            "p_prev": np.full(n, np.nan),
            "version": np.full(n, "", object),
            "horizon": np.full(n, -1, np.int64),
        }
        if self.skip:  # the first model's own training examples: their impressions are never scored
            k = min(self.skip, n)
            new["scored"][:k] = True
            self.skip -= k
            self.unscored += k
        self.open = table if self.open is None else pa.concat_tables([self.open, table], promote_options="default")
        self._state = new if not self._state else {c: np.concatenate([self._state[c], new[c]]) for c in new}

    def step(self, max_batches: int | None = None, max_rows: int | None = None) -> int:
        """Read what the feature job has emitted, then run the timeline up to the safe horizon.

        ``max_rows`` bounds how far ``passed`` (the trainer's allowance) may move in this call. Returns the
        timeline steps processed.
        """
        if self.served is None and self._pending_version() is None:
            return 0
        for i, (table, pos) in enumerate(self.store.batches(self.position, self.batch_size)):
            if self.served is None and self.read == 0:
                self.maybe_swap()  # the first version: its warm-up rows are known from here on
            self._take(table)
            self.position = pos
            if max_batches is not None and i + 1 >= max_batches:
                break
        if self.open is None or self.open.num_rows == 0:
            return 0
        horizon = np.iinfo(np.int64).max if self.final else self.closed_until - self.window_ms
        st = self._state
        ts, lts = self.open["ts"].to_numpy(), self.open["label_ts"].to_numpy()
        imp = np.flatnonzero(~st["scored"] & (ts <= horizon))
        out = np.flatnonzero(~st["written"] & (lts <= horizon))
        if not len(imp) and not len(out):
            return 0
        # the timeline: (time, impressions before outcomes of the same time, store order)
        when = np.concatenate([ts[imp], lts[out]])
        kind = np.concatenate([np.zeros(len(imp), np.int8), np.ones(len(out), np.int8)])
        rows = np.concatenate([imp, out])
        order = np.lexsort((st["seq"][rows], kind, when))
        when, kind, rows = when[order], kind[order], rows[order]
        start_passed, done = self.passed, 0
        for lo in range(0, len(rows), self.batch_size):
            if max_rows is not None and self.passed - start_passed >= max_rows:
                break
            hi = min(len(rows), lo + self.batch_size)
            self._run(rows[lo:hi], kind[lo:hi].astype(bool), when[lo:hi])
            done += hi - lo
        self._compact()
        return done

    def _run(self, rows: np.ndarray, write: np.ndarray, when: np.ndarray) -> None:

        st = self._state
        score_at = when[~write]
        if len(score_at):
            self.maybe_swap(int(score_at.min()))
        horizon = horizon_of(self.served.entry)
        if self.causal and horizon is not None and self.scored == 0:
            # the first version learned its warm-up freely (labels up to its horizon, in label order)
            self.warmup_until = max(self.warmup_until, horizon)
        if self.causal and self.warmup_until >= 0:
            # impressions up to the warm-up's horizon pass unscored, whenever they come: one whose label arrived
            # after the horizon is read later than the warm-up, possibly after scoring began (it is not a leak)
            early = ~write & (when <= self.warmup_until)
            if early.any():
                st["scored"][rows[early]] = True
                self.unscored += int(early.sum())
                rows, write, when = rows[~early], write[~early], when[~early]
        if not len(rows):
            return
        table = self.open.take(pa.array(rows))
        if self.causal and (~write).any():
            check_causal(self.served, when[~write])
        self.clock = int(when.max())
        self.last_ts = self.clock
        t0 = time.perf_counter()
        pb, pm = serve_timeline(self.served, table, write)
        self.score_seconds += time.perf_counter() - t0
        served = rows[~write]
        if len(served):
            self._count_served(int(when[~write].min()), len(served))
            if self.versions and not self.versions[-1]["ts"]:  # swapped in before any event: its start
                self.versions[-1]["ts"] = self.versions[-1]["first_served_ts"]
            st["scored"][served] = True
            st["p_base"][served], st["p_mem"][served] = pb[~write], pm[~write]
            st["version"][served] = self.served.version
            st["horizon"][served] = -1 if horizon is None else horizon
            prev = self._shadow_predictions(table.filter(pa.array(~write)))
            if prev is not None:
                st["p_prev"][served] = prev
            self.scored += len(served)
            if self.mark_ts is not None and self.mark_wall_s is None and int(when[~write].max()) >= self.mark_ts:
                self.mark_wall_s = round(time.time() - self.t0, 2)
                self.mark_event = self.scored
        arrived = rows[write]
        if len(arrived):
            st["written"][arrived] = True
            self._arrived(table.filter(pa.array(write)), arrived)

    def _arrived(self, table: pa.Table, rows: np.ndarray) -> None:
        """Outcomes that arrived: into the rebuild buffer, and, with the prediction served at impression time,
        into the trace, the predictions log and the monitors."""
        st = self._state
        self._remember(table)
        served = ~np.isnan(st["p_base"][rows])  # a warm-up row's impression was never served
        if not served.any():
            return
        t, r = table.filter(pa.array(served)), rows[served]
        for version in dict.fromkeys(st["version"][r].tolist()):
            same = st["version"][r] == version
            tv, rv = (t, r) if same.all() else (t.filter(pa.array(same)), r[same])
            prev = st["p_prev"][rv]
            prev = None if np.isnan(prev).all() else prev
            self.trace.add(tv, st["p_base"][rv], st["p_mem"][rv], prev, version, int(st["horizon"][rv][0]))
            self._deliver(tv, st["p_base"][rv], st["p_mem"][rv], prev, version)

    def _compact(self) -> None:
        """Drop rows whose impression and outcome steps are both behind the clock."""
        st = self._state
        keep = ~(st["scored"] & st["written"])
        if keep.all():
            return
        self.open = self.open.filter(pa.array(keep))
        self._state = {c: v[keep] for c, v in st.items()}

    # -- resume -----------------------------------------------------------------------------------
    def save(self, d) -> None:
        """The rows between their impression and their outcome, and the timeline's clocks (``--resume``)."""

        if self.open is not None and self.open.num_rows:
            t = self.open
            for c, v in self._state.items():
                t = t.append_column(f"__{c}", pa.array(v.tolist() if v.dtype == object else v))
            pq.write_table(t, d / "open.parquet")
        (d / "timeline.json").write_text(
            json.dumps(
                {
                    "read": self.read,
                    "closed_until": self.closed_until,
                    "clock": self.clock,
                    "skip": self.skip,
                    "warmup_until": self.warmup_until,
                }
            )
        )

    def load(self, d) -> None:

        if not (d / "timeline.json").exists():
            return
        s = json.loads((d / "timeline.json").read_text())
        self.read, self.closed_until, self.clock, self.skip = s["read"], s["closed_until"], s["clock"], s["skip"]
        self.warmup_until = int(s.get("warmup_until", -1))
        if (d / "open.parquet").exists():
            t = pq.read_table(d / "open.parquet")
            state = [c for c in t.column_names if c.startswith("__")]
            self._state = {c[2:]: t[c].to_numpy(zero_copy_only=False) for c in state}
            self._state["version"] = self._state["version"].astype(object)
            self.open = t.drop_columns(state)
