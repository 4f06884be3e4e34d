"""The records that travel between monitors, policy, hooks and the audit log.

All are frozen dataclasses that round-trip through plain JSON
(``to_dict`` / ``from_dict``), so they can go on a Kafka topic, into a JSONL
log or a webhook body without pickling anything.

>>> d = Detection("adwin:logloss", "logloss", "drift", 0.52, 0.002, 800, 1000, 2000, 12_000)
>>> Detection.from_dict(json.loads(json.dumps(d.to_dict()))) == d
True
>>> d.summary()
'adwin:logloss: drift on logloss (statistic 0.52 vs threshold 0.002, 800 events)'
>>> r = Request("retrain", "2 detectors agree", (d,), model_version="v3")
>>> alert_payload(r)["detector"], alert_payload(r)["event_time_range"]
('adwin:logloss', {'start': 1000, 'end': 2000})
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Level = Literal["warning", "drift"]
Action = Literal["alert", "retrain", "rollback"]
ACTIONS: tuple[str, ...] = ("alert", "retrain", "rollback")


def finite(x: float | None) -> float | None:
    """JSON has no inf/nan: map them to None so every payload is strict JSON."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Detection:
    """One monitor saying "something changed": what, how strongly, over which events."""

    detector: str
    metric: str
    level: Level
    statistic: float | None
    threshold: float | None
    #: number of events the statistic is computed over
    window: int
    ts_start: int | None
    ts_end: int | None
    #: how many events the monitor had seen when it fired
    index: int
    #: "performance" (loss/error/click detectors) or "distribution" (PSI/KS)
    family: str = "performance"
    model_version: str | None = None

    def summary(self) -> str:
        stat = "n/a" if self.statistic is None else f"{self.statistic:.4g}"
        thr = "n/a" if self.threshold is None else f"{self.threshold:.4g}"
        return (
            f"{self.detector}: {self.level} on {self.metric} "
            f"(statistic {stat} vs threshold {thr}, {self.window} events)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["statistic"], d["threshold"] = finite(self.statistic), finite(self.threshold)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Detection:
        return cls(**d)


@dataclass(frozen=True)
class Request:
    """What the policy asks for: ``alert`` only, ``retrain``, or ``rollback`` (to ``target_version``)."""

    action: Action
    reason: str
    detections: tuple[Detection, ...] = ()
    model_version: str | None = None
    target_version: str | None = None
    #: the event index (monitor's count) when the request was made
    index: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    level: Level = "drift"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; allowed: {', '.join(ACTIONS)}")

    @property
    def event_time_range(self) -> tuple[int | None, int | None]:
        starts = [d.ts_start for d in self.detections if d.ts_start is not None]
        ends = [d.ts_end for d in self.detections if d.ts_end is not None]
        return (min(starts) if starts else None, max(ends) if ends else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "detections": [d.to_dict() for d in self.detections],
            "model_version": self.model_version,
            "target_version": self.target_version,
            "index": self.index,
            "metrics": {k: finite(v) for k, v in self.metrics.items()},
            "level": self.level,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        d = dict(d)
        d["detections"] = tuple(Detection.from_dict(x) for x in d.get("detections", ()))
        return cls(**d)


def alert_payload(request: Request, alert_id: str | None = None, created_at: float | None = None) -> dict[str, Any]:
    """The webhook / alerts-topic body of a request.

    The top-level fields describe the strongest detection (the first one);
    ``evidence`` lists every detection that contributed.
    """
    top = request.detections[0] if request.detections else None
    start, end = request.event_time_range
    summary = f"reloop {request.action} ({request.level}): {request.reason}"
    if top is not None:
        summary += f"; {top.summary()}"
    return {
        "type": "alert",
        "id": alert_id or uuid.uuid4().hex,
        "created_at": created_at if created_at is not None else time.time(),
        "action": request.action,
        "level": request.level,
        "detector": top.detector if top else None,
        "metric": top.metric if top else None,
        "statistic": finite(top.statistic) if top else None,
        "threshold": finite(top.threshold) if top else None,
        "window": top.window if top else None,
        "event_time_range": {"start": start, "end": end},
        "model_version": request.model_version,
        "target_version": request.target_version,
        "summary": summary,
        "metrics": {k: finite(v) for k, v in request.metrics.items()},
        "evidence": [d.to_dict() for d in request.detections],
    }


AUDIT_KINDS = (
    "alert",
    "retrain_requested",
    "retrain_submitted",
    "candidate_evaluated",
    "promoted",
    "not_promoted",
    "rollback_requested",
    "rolled_back",
    "watch_started",
    "watch_passed",
    "action_failed",
    "rollback_declined",
    "incident_resolved",
)


@dataclass(frozen=True)
class AuditRecord:
    """One auditable step of the loop: what happened, why, with which metrics and model versions."""

    kind: str
    what: str
    why: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    #: e.g. {"current": "v3", "candidate": "v4"}
    versions: dict[str, str | None] = field(default_factory=dict)
    event_time_range: dict[str, int | None] = field(default_factory=lambda: {"start": None, "end": None})
    #: wall-clock seconds (time.time()) when the step happened
    created_at: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: links the records of one retrain -> evaluate -> promote chain
    correlation_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in AUDIT_KINDS:
            raise ValueError(f"unknown audit kind {self.kind!r}; allowed: {', '.join(AUDIT_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = {k: finite(v) for k, v in self.metrics.items()}
        d["type"] = "audit"
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditRecord:
        d = {k: v for k, v in d.items() if k != "type"}
        return cls(**d)


class AuditLog:
    """Append-only JSONL file of :class:`AuditRecord` (thread-safe; one line per record)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: AuditRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = record.to_json() + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(line)

    def read(self) -> Iterator[AuditRecord]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield AuditRecord.from_dict(json.loads(line))
