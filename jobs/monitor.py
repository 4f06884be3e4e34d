"""``reloop monitor``: drift monitors on the live stream of served predictions joined with labels.

Input: a Kafka topic (default ``reloop.predictions``) of JSON records::

    {"event_id": "...", "ts": 1767225600000, "user_id": "u1", "item_id": "i9",
     "p_base": 0.11, "p": 0.13, "label": 0, "model_version": "v000003",
     "p_prev": 0.12,                       # optional: the previous model's shadow prediction
     "item_pop": 1.7, "price": 20.5, ...}  # numeric features (top level or under "features")

For each record the :class:`MonitorLoop` feeds the monitors, asks the policy,
sends alerts through the hooks, writes every step as an
:class:`~online_models.drift.records.AuditRecord` (JSONL log + alerts topic), and
carries out ``retrain`` / ``rollback`` requests through an :class:`Actions`
object. The Ray retrain job, the evaluation gate and the registry promotion
are plugged in there; without one the loop only alerts.

>>> from online_models.drift.monitors import MonitorSuite
>>> from online_models.drift.policy import DriftPolicy
>>> from jobs.alerts import HookDispatcher
>>> loop = MonitorLoop(MonitorSuite.from_specs([{"kind": "adwin", "metric": "logloss"}]), DriftPolicy(),
...                    HookDispatcher([]))
>>> rec = parse_prediction(b'{"event_id": "e1", "ts": 1, "user_id": "u", "item_id": "i", "p": 0.2, "label": 1}')
>>> loop.process(rec), loop.n
([], 1)
>>> parse_prediction(b'{"p": 2}')
'missing field(s): event_id, ts, label'
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow.fs as pafs
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata

from jobs.alerts import dispatcher_from_config
from jobs.deploy import Candidate, Evaluation
from online_models.drift.incidents import IncidentTracker
from online_models.drift.monitors import MonitorSuite, batch_signals, event_signals
from online_models.drift.policy import DriftPolicy
from online_models.drift.records import AuditLog, AuditRecord, Request, alert_payload
from pipelines.kafka_io import ensure_topics
from pipelines.storage import write_bytes_atomic

log = logging.getLogger(__name__)

REQUIRED = ("event_id", "ts", "label")
RESERVED = frozenset(
    {"event_id", "ts", "user_id", "item_id", "p", "p_base", "p_prev", "label", "model_version", "features"}
)
MAX_RECORD_BYTES = 1 << 20


# --------------------------------------------------------------------------- input records


@dataclass(frozen=True)
class PredictionRecord:
    event_id: str
    ts: int
    user_id: str | None
    item_id: str | None
    p: float
    label: int
    model_version: str | None = None
    p_base: float | None = None
    p_prev: float | None = None
    features: dict[str, float] = field(default_factory=dict)


def _prob(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        return None
    return float(v)


def parse_prediction(raw: bytes | str | Mapping[str, Any]) -> PredictionRecord | str:
    """Parse one record; returns the record, or the reason it is rejected (never raises)."""
    if isinstance(raw, (bytes, str)):
        if len(raw) > MAX_RECORD_BYTES:
            return f"record of {len(raw)} bytes exceeds {MAX_RECORD_BYTES}"
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return f"not JSON: {e}"
    if not isinstance(raw, Mapping):
        return f"expected a JSON object, got {type(raw).__name__}"
    missing = [k for k in REQUIRED if k not in raw]
    if "p" not in raw and "p_base" not in raw:
        missing.insert(0, "p")
    if missing:
        return f"missing field(s): {', '.join(missing)}"
    p = _prob(raw.get("p", raw.get("p_base")))
    if p is None:
        return f"p must be a probability in [0, 1], got {raw.get('p', raw.get('p_base'))!r}"
    label = raw["label"]
    if label not in (0, 1) or isinstance(label, float) and not float(label).is_integer():
        return f"label must be 0 or 1, got {label!r}"
    ts = raw["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        return f"ts must be a non-negative integer (epoch ms), got {ts!r}"
    feats: dict[str, float] = {}
    source = dict(raw.get("features") or {}) if isinstance(raw.get("features"), Mapping) else {}
    source.update({k: v for k, v in raw.items() if k not in RESERVED})
    for k, v in source.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            feats[str(k)] = float(v)
    mv = raw.get("model_version")
    return PredictionRecord(
        str(raw["event_id"]),
        ts,
        _str(raw.get("user_id")),
        _str(raw.get("item_id")),
        p,
        int(label),
        None if mv is None else str(mv),
        _prob(raw.get("p_base")),
        _prob(raw.get("p_prev")),
        feats,
    )


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


# --------------------------------------------------------------------------- the actions protocol


class Actions(Protocol):
    """What the job layer plugs in (Ray retrain job, evaluation gate, registry)."""

    def request_retrain(self, request: Request) -> Candidate | None:
        """Submit a retrain; return the candidate when it finished synchronously, or None when the job
        layer will hand it over later with :meth:`MonitorLoop.candidate_ready` (thread-safe)."""

    def evaluate_candidate(self, candidate: Candidate, current_version: str | None) -> Evaluation:
        """Compare the candidate with the current model on a holdout slot of the most recent data."""

    def promote(self, candidate: Candidate) -> str:
        """Make the candidate current; return the version now serving."""

    def rollback(self, to_version: str | None, from_version: str | None) -> str:
        """Make ``to_version`` current again; return the version now serving."""


# --------------------------------------------------------------------------- the loop


class MonitorLoop:
    """Monitors -> policy -> hooks -> actions, every step audited. Never raises on a failing hook or action."""

    def __init__(
        self,
        suite: MonitorSuite,
        policy: DriftPolicy,
        dispatcher: Any,
        actions: Actions | None = None,
        audit: AuditLog | None = None,
        on_request: Callable[[Request], None] | None = None,
        loss_window: int = 5000,
        incident_gap_events: int = 10_000,
    ) -> None:
        self.suite, self.policy, self.dispatcher, self.actions = suite, policy, dispatcher, actions
        self.audit, self.on_request = audit, on_request
        #: alerts of one shift form one incident: the hooks get its opening alert, then only the requests
        #: that act (retrain, rollback) and the resolution; every raw alert stays in the audit log
        self.incidents = IncidentTracker(incident_gap_events)
        self.n = 0
        self.current_version: str | None = None
        self.requests: list[Request] = []
        self._losses: deque[float] = deque(maxlen=loss_window)
        self._ts_range: list[int | None] = [None, None]
        self._ready: queue.SimpleQueue = queue.SimpleQueue()

    def candidate_ready(self, cand: Candidate, correlation_id: str | None = None) -> None:
        """Thread-safe hand-over of a candidate from an asynchronous retrain (a Ray job watcher thread);
        it is gated on the loop's own thread, before the next record."""
        self._ready.put((cand, correlation_id))

    # ------------------------------------------------------------------ per record
    def process(self, rec: PredictionRecord) -> list[Request]:
        self._drain()
        self._version(rec.model_version)
        loss = event_signals(rec.p, rec.label)["logloss"]
        dets = self.suite.update(rec.p, rec.label, rec.features, ts=rec.ts, model_version=rec.model_version)
        return self._row(rec.ts, rec.label, loss, rec.p_prev, rec.model_version, dets)

    def process_batch(
        self,
        ts: np.ndarray,
        p: np.ndarray,
        labels: np.ndarray,
        model_version: str | None = None,
        p_prev: np.ndarray | None = None,
    ) -> list[Request]:
        """:meth:`process` of a batch of one model's labelled predictions (arrays, stream order), without a
        record per event: the same requests, audit records and end state as feeding them one by one.

        The monitors take the batch as arrays (:meth:`MonitorSuite.update_batch`: nothing in a batch can
        rebase them, the version being the batch's). Only the rows where something happens (a detection, an
        incident's resolution, every row while a promotion is watched) go through the per-row step; the quiet
        runs between them advance the counters at once, which is exact: with no detection the policy only
        forgets old evidence and clears its state by index, and both are monotone in it.
        """
        n = len(p)
        if n == 0:
            return []
        self._drain()
        self._version(model_version)
        ts_l = np.asarray(ts).tolist()
        losses = batch_signals(p, labels)["logloss"].tolist()
        labels_l = np.asarray(labels).tolist()
        prev = None if p_prev is None else np.asarray(p_prev, dtype=np.float64).tolist()
        hits: dict[int, list] = {}
        for i, det in self.suite.update_batch(p, labels, ts=np.asarray(ts), model_version=model_version):
            hits.setdefault(i, []).append(det)
        rows = sorted(hits)
        out: list[Request] = []
        i = 0
        while i < n:
            watch = self.policy.watch
            step_one = (watch is not None and model_version == watch.new_version) or (bool(rows) and rows[0] == i)
            end = rows[0] if rows else n
            inc = self.incidents.open
            if inc is not None and not step_one:  # the row whose tick resolves the open incident steps alone
                resolves = i + inc.last_event + self.incidents.gap_events - (self.n + 1)
                step_one = resolves <= i
                end = min(end, resolves)
            if step_one:
                if rows and rows[0] == i:
                    rows.pop(0)
                q = None if prev is None else prev[i]
                out += self._row(ts_l[i], labels_l[i], losses[i], q, model_version, hits.get(i, []))
                i += 1
                continue
            # a quiet run, rows i..end-1: the counters advance together
            self.n += end - i
            self._ts_range = [ts_l[i] if self._ts_range[0] is None else self._ts_range[0], ts_l[end - 1]]
            self._losses.extend(losses[i:end])
            self.policy.step(self.n, (), model_version)
            i = end
        return out

    def _drain(self) -> None:
        while not self._ready.empty():
            self.on_candidate(*self._ready.get_nowait())

    def _version(self, version: str | None) -> None:
        if version is not None and version != self.current_version:
            if self.current_version is not None:  # a new model serves: its history starts now
                self.suite.rebase()
                self._losses.clear()
            self.current_version = version

    def _row(
        self, ts: int, label: int, loss: float, p_prev: float | None, version: str | None, dets: list
    ) -> list[Request]:
        """One event after the monitors saw it: incidents, the policy, a watched promotion, the requests."""
        self.n += 1
        for inc in self.incidents.tick(self.n, ts):
            self._record(
                "incident_resolved",
                f"incident {inc.id} resolved",
                inc.resolution or "",
                {"alerts": inc.alerts},
                details={"incident": inc.id, "evidence": inc.evidence},
            )
        self._ts_range = [ts if self._ts_range[0] is None else self._ts_range[0], ts]
        self._losses.append(loss)
        reqs = self.policy.step(self.n, dets, version)
        watch = self.policy.watch
        if watch is not None and version == watch.new_version:
            old = None if p_prev is None else event_signals(p_prev, label)["logloss"]
            reqs += self.policy.observe_loss(self.n, loss, old)
            if self.policy.watch is None and not any(r.action == "rollback" for r in reqs):
                self._record(
                    "watch_passed",
                    f"{watch.new_version} kept after {watch.n} live events",
                    "live loss not worse than the previous model's by the margin",
                    {"live_logloss": watch.mean, "reference_logloss": watch.reference},
                    {"current": watch.new_version, "previous": watch.old_version},
                )
        for r in reqs:
            self.handle(r)
        return reqs

    def handle(self, req: Request) -> None:
        """Alert through the hooks, audit, then carry out the request (retrain / rollback)."""
        self.requests.append(req)
        payload = alert_payload(req)
        verb, inc = self.incidents.observe_alert(
            {
                "at_event": self.n,
                "ts": self._ts_range[1],
                "summary": req.reason,
                "detectors": [d.detector for d in req.detections],
            }
        )
        payload["incident"] = {"id": inc.id, "status": verb, "alerts": inc.alerts}
        if verb == "opened" or req.action != "alert":
            self._safe(self.dispatcher.deliver, payload)
        start, end = req.event_time_range
        self._record(
            "alert",
            f"{req.action} requested ({req.level})",
            req.reason,
            dict(req.metrics),
            {"current": req.model_version or self.current_version, "target": req.target_version},
            {"start": start, "end": end},
            details={"alert_id": payload["id"], "incident": inc.id, "detectors": [d.detector for d in req.detections]},
        )
        if self.on_request is not None:
            self._safe(self.on_request, req)
        if req.action == "retrain":
            self._retrain(req)
        elif req.action == "rollback":
            self._rollback(req)

    def _retrain(self, req: Request) -> None:
        corr = uuid.uuid4().hex
        self._record(
            "retrain_requested",
            "retrain requested",
            req.reason,
            versions={"current": self.current_version},
            correlation_id=corr,
        )
        if self.actions is None:
            return
        try:
            cand = self.actions.request_retrain(req)
        except Exception as e:  # noqa: BLE001 - a failed submission is audited, monitoring goes on
            self._failed("request_retrain", e, corr)
            return
        self._record(
            "retrain_submitted",
            "retrain job submitted" if cand is None else f"candidate {cand.version} trained",
            req.reason,
            dict(cand.metrics) if cand else {},
            {"current": self.current_version, "candidate": cand.version if cand else None},
            correlation_id=corr,
            details={"job_id": cand.job_id if cand else None},
        )
        if cand is not None:
            self.on_candidate(cand, corr)

    def on_candidate(self, cand: Candidate, correlation_id: str | None = None) -> bool:
        """Gate a trained candidate and promote it if better; returns True when promoted."""
        if self.actions is None:
            return False
        old = self.current_version
        try:
            ev = self.actions.evaluate_candidate(cand, old)
        except Exception as e:  # noqa: BLE001
            self._failed("evaluate_candidate", e, correlation_id)
            return False
        metrics = {
            **{f"candidate_{k}": v for k, v in ev.candidate_metrics.items()},
            **{f"current_{k}": v for k, v in ev.current_metrics.items()},
        }
        versions = {"current": old, "candidate": cand.version}
        self._record(
            "candidate_evaluated",
            f"candidate {cand.version} {'beats' if ev.better else 'does not beat'} {old}",
            ev.reason or "evaluation gate on the holdout slot",
            metrics,
            versions,
            correlation_id=correlation_id,
        )
        if not ev.better:
            self._record(
                "not_promoted",
                f"{old} stays current",
                ev.reason or "candidate not better by the margin",
                metrics,
                versions,
                correlation_id=correlation_id,
            )
            return False
        try:
            serving = self.actions.promote(cand)
        except Exception as e:  # noqa: BLE001 - a failed deploy keeps the old model
            self._failed("promote", e, correlation_id)
            return False
        # the rollback watch's reference: the current model's logloss on the gate's holdout slot (recent,
        # i.e. after the drift) when the gate reports it; the live loss before promotion would be an
        # unfair, pre-drift reference right after an abrupt shift
        baseline = ev.current_metrics.get("logloss")
        if baseline is None and self._losses:
            baseline = sum(self._losses) / len(self._losses)
        self._record(
            "promoted",
            f"{serving} promoted over {old}",
            ev.reason or "candidate better by the margin",
            metrics,
            {"current": serving, "previous": old},
            correlation_id=correlation_id,
        )
        self.policy.start_watch(self.n, serving, old, baseline)
        self._record(
            "watch_started",
            f"rollback watch on {serving}",
            "after a promotion the live loss is compared with the previous model's",
            {"baseline_logloss": baseline},
            {"current": serving, "previous": old},
            correlation_id=correlation_id,
        )
        return True

    def _rollback(self, req: Request) -> None:
        if self.actions is None:
            return
        try:
            serving = self.actions.rollback(req.target_version, req.model_version)
        except Exception as e:  # noqa: BLE001
            self._failed("rollback", e, None)
            return
        if serving and serving == self._serving_version():
            self._record(
                "rollback_declined",
                f"{serving} stays current",
                "the gate found no evidence that the previous model is better",
                dict(req.metrics),
                {"current": serving},
            )
            return
        self._record(
            "rolled_back",
            f"rolled back to {serving}",
            req.reason,
            dict(req.metrics),
            {"current": serving, "rolled_back": req.model_version},
        )

    def _serving_version(self) -> str | None:
        live = getattr(self.actions, "live", None)
        served = getattr(live, "served", None)
        return getattr(served, "version", None)

    # ------------------------------------------------------------------ audit
    def _record(
        self,
        kind: str,
        what: str,
        why: str,
        metrics: dict | None = None,
        versions: dict | None = None,
        event_time_range: dict | None = None,
        correlation_id: str | None = None,
        details: dict | None = None,
    ) -> AuditRecord:
        rec = AuditRecord(
            kind,
            what,
            why,
            metrics or {},
            versions or {},
            event_time_range or {"start": self._ts_range[0], "end": self._ts_range[1]},
            correlation_id=correlation_id,
            details=details or {},
        )
        if self.audit is not None:
            self._safe(self.audit.append, rec)
        if kind != "alert":  # the alert itself already went to every hook
            self._safe(self.dispatcher.deliver, rec.to_dict(), record=True)
        return rec

    def _failed(self, action: str, e: Exception, corr: str | None) -> None:
        log.error("action %s failed: %r", action, e)
        self._record(
            "action_failed",
            f"{action} failed",
            f"{type(e).__name__}: {e}",
            versions={"current": self.current_version},
            correlation_id=corr,
        )

    @staticmethod
    def _safe(fn: Callable, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - delivery and callbacks never stop monitoring
            log.exception("%s failed", getattr(fn, "__qualname__", fn))

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "current_version": self.current_version,
            "suite": self.suite.state_dict(),
            "policy": self.policy.state_dict(),
            "losses": list(self._losses),
            "ts_range": self._ts_range,
        }

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        self.n, self.current_version = int(s["n"]), s["current_version"]
        self.suite.load_state_dict(s["suite"])
        self.policy.load_state_dict(s["policy"])
        self._losses.clear()
        self._losses.extend(float(x) for x in s["losses"])
        self._ts_range = list(s["ts_range"])


def build_loop(
    cfg: Any,
    actions: Actions | None = None,
    callbacks: tuple[Callable, ...] = (),
    dispatcher: Any = None,
    on_request: Callable[[Request], None] | None = None,
) -> MonitorLoop:
    """A :class:`MonitorLoop` from a :class:`reloop.config.ReloopConfig`."""

    d = cfg.drift
    specs = [m.model_dump() for m in d.monitors]
    specs += [{"kind": k, "metric": f, "params": {}, "warmup": 0} for f in d.features for k in d.feature_tests]
    suite = MonitorSuite.from_specs(specs)
    policy = DriftPolicy(**d.policy.model_dump())
    dispatcher = dispatcher if dispatcher is not None else dispatcher_from_config(cfg, callbacks)
    return MonitorLoop(suite, policy, dispatcher, actions, AuditLog(d.audit_log_path), on_request)


def save_state(loop: MonitorLoop, path: str | Path) -> None:
    """Atomic JSON checkpoint of the loop (monitors, policy, counters)."""
    write_bytes_atomic(
        pafs.LocalFileSystem(), os.path.abspath(path), json.dumps(loop.state_dict(), allow_nan=False).encode()
    )


def load_state(loop: MonitorLoop, path: str | Path) -> bool:
    path = Path(path)
    if not path.exists():
        return False
    try:
        loop.load_state_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: monitor checkpoint cannot be restored ({type(e).__name__}: {e}); move it away to start fresh"
        ) from e
    return True


@dataclass
class MonitorStats:
    records: int = 0
    rejected: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def run_monitor(
    cfg: Any,
    *,
    topic: str | None = None,
    from_beginning: bool = False,
    max_records: int | None = None,
    idle_timeout_s: float | None = None,
    actions: Actions | None = None,
    callbacks: tuple[Callable, ...] = (),
    state_path: str | None = None,
    stop: Any = None,
    on_request: Callable[[Request], None] | None = None,
    loop: MonitorLoop | None = None,
) -> MonitorStats:
    """Consume the predictions topic and run the loop until ``max_records``, ``idle_timeout_s`` of silence,
    or ``stop.is_set()``. Monitor state is checkpointed to JSON, then the offsets are committed.

    ``callbacks`` get every alert and audit record (dicts); ``on_request`` gets each
    :class:`Request`; pass a prebuilt ``loop`` to keep a handle on it (e.g. for ``candidate_ready``)."""

    topic = topic or cfg.drift.predictions_topic
    state_path = state_path or cfg.drift.state_path
    loop = loop if loop is not None else build_loop(cfg, actions, callbacks, on_request=on_request)
    resumed = load_state(loop, state_path)
    ensure_topics(cfg.kafka, [topic, cfg.hooks.kafka_topic or cfg.kafka.alerts_topic])
    consumer = KafkaConsumer(
        topic,
        **cfg.kafka.client_options(),
        group_id=cfg.drift.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        max_poll_records=2000,
    )
    stats = MonitorStats()
    t0 = last = time.monotonic()
    since_ckpt = 0
    done: dict[Any, int] = {}  # next offset per partition, of records actually processed

    def commit() -> None:
        save_state(loop, state_path)  # state first: a crash in between replays records, never skips them
        if done:
            consumer.commit({tp: OffsetAndMetadata(off, None, -1) for tp, off in done.items()})

    log.info("monitoring %s (resumed=%s)", topic, resumed)
    try:
        while not (stop is not None and stop.is_set()):
            batches = consumer.poll(timeout_ms=500)
            if not batches:
                if idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                    break
                continue
            last = time.monotonic()
            for tp, records in batches.items():
                for r in records:
                    done[tp] = r.offset + 1
                    rec = parse_prediction(r.value)
                    if isinstance(rec, str):
                        stats.rejected += 1
                        if stats.rejected <= 10 or stats.rejected % 1000 == 0:
                            log.warning(
                                "rejected prediction record at %s[%d]@%d: %s (%d rejected so far)",
                                r.topic,
                                r.partition,
                                r.offset,
                                rec,
                                stats.rejected,
                            )
                        continue
                    stats.records += 1
                    since_ckpt += 1
                    for req in loop.process(rec):
                        stats.requests[req.action] = stats.requests.get(req.action, 0) + 1
                    if max_records is not None and stats.records >= max_records:
                        break
                if max_records is not None and stats.records >= max_records:
                    break
            if since_ckpt >= cfg.drift.checkpoint_every:
                commit()
                since_ckpt = 0
            if max_records is not None and stats.records >= max_records:
                break
    except KeyboardInterrupt:  # Ctrl-C: checkpoint and commit what was processed, then stop cleanly
        log.info("interrupted after %d records", stats.records)
    finally:
        try:
            commit()
        finally:
            consumer.close()
            loop.dispatcher.close()
    stats.seconds = time.monotonic() - t0
    return stats
