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
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from jobs.examples import ExampleStore, Position
from jobs.registry import ModelRegistry
from jobs.scoring import Bundle, load_bundle
from online_models.memory import write_groups


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
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, table: pa.Table, p_base: np.ndarray, p_mem: np.ndarray, p_prev: np.ndarray | None = None) -> None:
        cols = (table["ts"].to_numpy(), table["label"].to_numpy().astype(np.float64),
                table["user_id"].to_numpy(zero_copy_only=False).astype(object),
                table["event_id"].to_numpy(zero_copy_only=False).astype(object))
        with self.lock:
            for chunks, values in zip((self.ts, self.y, self.user, self.event_id), cols):
                chunks.append(values)
            self.p_base.append(p_base)
            self.p_mem.append(p_mem)
            self.p_prev.append(np.full(len(p_base), np.nan) if p_prev is None else p_prev)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every column as one array. The chunks are merged in place, so the progress display, the gate and
        the deployer, which ask often, concatenate only what arrived since the last call."""
        out = {}
        with self.lock:
            for name, dtype in (("ts", np.int64), ("y", float), ("p_base", float), ("p_mem", float),
                                ("p_prev", float), ("user", object), ("event_id", object)):
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
                 monitor=None, buffer_rows: int = 5000, batch_size: int = 512, shadow_events: int = 20_000) -> None:
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

    # -- model swaps ------------------------------------------------------------------------------
    def recent(self) -> pa.Table | None:
        """The bounded buffer of recent outcomes (what a new model's memory is rebuilt from)."""
        return pa.concat_tables(list(self.buffer)) if self.buffer else None

    def maybe_swap(self) -> bool:
        """Load the registry's current version if it is not the one being served; rebuild the memory."""
        pointer = self.registry.pointer()
        current = pointer["version"] if pointer else None
        if current is None or (self.served is not None and self.served.version == current):
            return False
        new = load_bundle(self.registry, current, self.memory_config)
        entry = new.entry
        recent = self.recent()
        rebuilt = (new.memory.rebuild([new.encoder.encode(recent)], new.model, key_fn=new.key)
                   if recent is not None else 0)
        previous = self.served
        reason = pointer.get("reason") or "promoted"
        if previous is None or not reason.startswith("refresh"):
            self.lineage = current
        if previous is None and self.scored == 0:
            self.skip = max(0, int(entry.training_range.get("learned", 0)) - self.unscored)
        self.served = new
        self.shadow = (previous, self.scored) if previous is not None else None
        self.versions.append({"ts": int(self.last_ts), "wall_s": round(time.time() - self.t0, 2), "version": current,
                              "previous": previous.version if previous else None,
                              "reason": reason, "lineage": self.lineage, "memory_rebuilt_from": rebuilt,
                              "at_event": self.scored, "source": entry.extra.get("source")})
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def step(self, max_batches: int | None = None, max_rows: int | None = None) -> int:
        """Process the examples that arrived since the last call (or ``max_batches`` of them).

        Before the first version is current nothing is consumed: the first model's own training examples
        are then passed over (buffered for the memory, not scored) and scoring starts right after them.
        ``max_rows`` bounds how far the loop may go in this call (the run keeps serving within a bounded lag
        of the trainer, as in real time, even when the replay runs at full speed).
        """
        if self.served is None and not self.maybe_swap():
            return 0
        done = 0
        size = self.batch_size if max_rows is None else max(0, min(self.batch_size, max_rows))
        if size == 0:
            return 0
        for i, (table, pos) in enumerate(self.store.batches(self.position, size)):
            self.maybe_swap()
            self._process(table)
            self.position = pos
            done += table.num_rows
            if max_batches is not None and i + 1 >= max_batches:
                break
            if max_rows is not None and done + size > max_rows:
                break
        return done

    def _score(self, s: Bundle, table: pa.Table, learn: bool) -> tuple[np.ndarray, np.ndarray]:
        batch = s.encoder.encode(table)
        with torch.no_grad():
            logits, hidden = s.model(batch)
            p_base = torch.sigmoid(logits)
            key = s.key(batch, hidden)
            if learn:  # each label arrives right after its event: written before the next event is scored
                groups = write_groups(table["ts"].to_numpy(), "timestamp")
                p_mem = s.memory.step(key, p_base, batch["label"], groups)
            else:
                p_mem = s.memory.estimate(key, p_base)
        return p_base.numpy().astype(np.float64), p_mem.numpy().astype(np.float64)

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
        t0 = time.perf_counter()
        pb, pm = self._score(self.served, table, learn=True)
        self.score_seconds += time.perf_counter() - t0
        prev = None
        if self.shadow is not None:
            old, since = self.shadow
            if self.scored - since < self.shadow_events:
                prev = self._score(old, table, learn=False)[0]
            else:
                self.shadow = None
        if self.mark_ts is not None and self.mark_wall_s is None and int(table["ts"].to_numpy().max()) >= self.mark_ts:
            self.mark_wall_s = round(time.time() - self.t0, 2)
            self.mark_event = self.scored + int((table["ts"].to_numpy() < self.mark_ts).sum())
        self.trace.add(table, pb, pm, prev)
        self.scored += table.num_rows
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
