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
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.examples import ExampleStore, Position
from jobs.registry import ModelRegistry
from jobs.scoring import Bundle, base_predictions, check_causal, horizon_of, load_bundle, rebuild_memory, score_rows


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
    p_prev: list[np.ndarray] = field(default_factory=list)   # the previous version's shadow (NaN: none)
    user: list[np.ndarray] = field(default_factory=list)
    event_id: list[np.ndarray] = field(default_factory=list)
    version: list[np.ndarray] = field(default_factory=list)   # the version that served each event
    horizon: list[np.ndarray] = field(default_factory=list)   # its trained_until_ts (ms)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, table: pa.Table, p_base: np.ndarray, p_mem: np.ndarray, p_prev: np.ndarray | None = None,
            version: str = "", horizon: int | None = None) -> None:
        cols = (table["ts"].to_numpy(), table["label"].to_numpy().astype(np.float64),
                table["user_id"].to_numpy(zero_copy_only=False).astype(object),
                table["event_id"].to_numpy(zero_copy_only=False).astype(object))
        with self.lock:
            for chunks, values in zip((self.ts, self.y, self.user, self.event_id), cols):
                chunks.append(values)
            self.p_base.append(p_base)
            self.p_mem.append(p_mem)
            self.p_prev.append(np.full(len(p_base), np.nan) if p_prev is None else p_prev)
            self.version.append(np.full(len(p_base), version, object))
            self.horizon.append(np.full(len(p_base), -1 if horizon is None else horizon, np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column as one array. The chunks are merged in place, so the progress display, the gate and
        the deployer, which ask often, concatenate only what arrived since the last call."""
        out = {}
        with self.lock:
            for name, dtype in (("ts", np.int64), ("y", float), ("p_base", float), ("p_mem", float),
                                ("p_prev", float), ("user", object), ("event_id", object), ("version", object),
                                ("horizon", np.int64)):
                chunks = getattr(self, name)
                if len(chunks) > 1:
                    chunks[:] = [np.concatenate(chunks)]
                out[name] = chunks[0] if chunks else np.zeros(0, dtype)
        return out

    def promotions(self, versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """After each model swap: the new model against the previous one (its shadow) on the same events."""
        from online_models.metrics import auc, logloss

        a = self.arrays()
        out = []
        starts = [v["at_event"] for v in versions] + [len(a["y"])]
        for v, lo, hi in zip(versions, starts, starts[1:]):
            y, new, old = a["y"][lo:hi], a["p_base"][lo:hi], a["p_prev"][lo:hi]
            ok = ~np.isnan(old)
            if v.get("previous") is None or ok.sum() < 50 or not 0 < y[ok].sum() < ok.sum():
                continue
            out.append({"version": v["version"], "previous": v["previous"], "reason": v["reason"], "ts": v["ts"],
                        "n": int(ok.sum()), "auc_new": round(auc(y[ok], new[ok]), 6),
                        "auc_previous": round(auc(y[ok], old[ok]), 6),
                        "logloss_new": round(logloss(y[ok], new[ok]), 6),
                        "logloss_previous": round(logloss(y[ok], old[ok]), 6)})
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

    def __init__(self, examples_uri: str, registry: ModelRegistry, memory_config: dict[str, Any],
                 monitor=None, buffer_rows: int = 20_000, batch_size: int = 512, shadow_events: int = 20_000,
                 causal: bool = True) -> None:
        self.store = ExampleStore(examples_uri)
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
        self.shadow: tuple[Bundle, int] | None = None   # the previous model, scored alongside for a while
        self.trace = Trace()
        self.unscored = 0          # examples that arrived before any model was current
        self.scored = 0
        self.versions: list[dict[str, Any]] = []
        self.last_ts = 0
        self.score_seconds = 0.0
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
            self.waiting = (load_bundle(self.registry, current, self.memory_config),
                            pointer.get("reason") or "promoted")
        return self.waiting[0]

    def maybe_swap(self, next_ts: int | None = None) -> bool:
        """Serve the registry's current version from the next event on, if the clock allows it.

        One causal clock: a version may serve an event only if everything it learned has an earlier event
        time (``trained_until_ts`` < the event's ``ts``). A version whose horizon reaches ``next_ts`` (the
        first event of the next batch) waits: the one serving goes on until the stream has passed it.
        """
        new = self._pending_version()
        if new is None:
            return False
        horizon = horizon_of(new.entry)
        if self.causal and next_ts is not None and horizon is not None and next_ts <= horizon \
                and self.served is not None:
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
        self.versions.append({"ts": int(self.last_ts), "wall_s": round(time.time() - self.t0, 2),
                              "version": new.version, "previous": previous.version if previous else None,
                              "reason": reason, "lineage": self.lineage, "memory_rebuilt_from": rebuilt,
                              "at_event": self.scored, "source": entry.extra.get("source"),
                              "trained_until_ts": horizon, "first_served_ts": None, "served_events": 0})
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

    def _process(self, table: pa.Table) -> None:
        if self.versions and not self.versions[-1]["ts"]:  # a version swapped in before any event: its start
            self.versions[-1]["ts"] = int(table["ts"].to_numpy().min())
        self.last_ts = int(table["ts"].to_numpy().max())
        self.buffer.append(table)
        while sum(t.num_rows for t in self.buffer) - self.buffer[0].num_rows >= self.buffer_rows:
            self.buffer.popleft()
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
        v = self.versions[-1] if self.versions else None
        if v is not None and v["version"] == self.served.version:
            if v["first_served_ts"] is None:
                v["first_served_ts"] = int(table["ts"].to_numpy().min())
            v["served_events"] += table.num_rows
        t0 = time.perf_counter()
        pb, pm = score_rows(self.served, table, learn=True)
        self.score_seconds += time.perf_counter() - t0
        prev = None
        if self.shadow is not None:
            old, since = self.shadow
            if self.scored - since < self.shadow_events:
                prev = base_predictions(old, table)
            else:
                self.shadow = None
        if self.mark_ts is not None and self.mark_wall_s is None and int(table["ts"].to_numpy().max()) >= self.mark_ts:
            self.mark_wall_s = round(time.time() - self.t0, 2)
            self.mark_event = self.scored + int((table["ts"].to_numpy() < self.mark_ts).sum())
        self.trace.add(table, pb, pm, prev, self.served.version, horizon)
        self.scored += table.num_rows
        if self.publish is not None:
            try:
                self.publish(table, pb, pm, prev, self.served.version)
            except Exception as e:  # noqa: BLE001 - the log on Kafka is for outside readers; serving goes on
                self.publish_errors += 1
                self.last_publish_error = repr(e)
        if self.monitor is not None:
            self._monitor(table, pb, pm, prev)

    def _monitor(self, table: pa.Table, p_base: np.ndarray, p_mem: np.ndarray, p_prev: np.ndarray | None) -> None:
        from jobs.monitor import PredictionRecord

        version = self.lineage
        ids, users, items = (table[c].to_pylist() for c in ("event_id", "user_id", "item_id"))
        ts, labels = table["ts"].to_pylist(), table["label"].to_pylist()
        for j in range(len(ids)):
            self.monitor.process(PredictionRecord(
                ids[j], ts[j], users[j], items[j], float(p_base[j]), int(labels[j]), version, float(p_base[j]),
                None if p_prev is None else float(p_prev[j])))


class PredictionLog:
    """Publishes every scored event, with its label, on the predictions topic (``reloop monitor`` reads it).

    One JSON record per event (the format of :func:`jobs.monitor.parse_prediction`), keyed by user id;
    sent asynchronously, flushed on :meth:`close`.
    """

    def __init__(self, kafka_cfg, topic: str, run_id: str | None = None, features: tuple[str, ...] = ()) -> None:
        from pipelines.kafka_io import producer

        self.topic, self.run_id, self.features = topic, run_id, features
        self.producer = producer(kafka_cfg)
        self.sent = 0

    def __call__(self, table: pa.Table, p_base: np.ndarray, p_mem: np.ndarray, p_prev: np.ndarray | None,
                 version: str) -> None:
        import json

        cols = {c: table[c].to_pylist() for c in ("event_id", "ts", "user_id", "item_id", "label")}
        feats = {f: table[f].to_pylist() for f in self.features if f in table.column_names}
        for j in range(table.num_rows):
            rec = {"event_id": cols["event_id"][j], "ts": int(cols["ts"][j]), "user_id": cols["user_id"][j],
                   "item_id": cols["item_id"][j], "label": int(cols["label"][j]), "p": round(float(p_mem[j]), 6),
                   "p_base": round(float(p_base[j]), 6), "model_version": version, "run_id": self.run_id}
            if p_prev is not None and np.isfinite(p_prev[j]):
                rec["p_prev"] = round(float(p_prev[j]), 6)
            for f, vals in feats.items():
                if isinstance(vals[j], (int, float)) and np.isfinite(vals[j]):
                    rec[f] = vals[j]
            self.producer.send(self.topic, key=str(cols["user_id"][j]).encode(), value=json.dumps(rec).encode())
        self.sent += table.num_rows

    def close(self) -> None:
        self.producer.flush(timeout=30)
        self.producer.close(timeout=10)
