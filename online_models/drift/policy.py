"""The drift policy: it only decides.

:class:`DriftPolicy` reads the monitors' detections and emits
:class:`~online_models.drift.records.Request` s (``alert``, ``retrain``,
``rollback``); the job layer carries them out.

- **Minimum evidence**: ``retrain`` needs drift-level detections from at least
  ``min_evidence`` distinct *performance* monitors (loss / error / click)
  within the last ``evidence_window`` events. Distribution monitors (PSI/KS)
  alone only ever raise an ``alert``: a covariate shift is not proof that the
  model got worse.
- **Hysteresis**: the policy is ``stable``, ``warning`` or ``drift``. A
  warning moves ``stable -> warning`` and sends one ``alert`` (level
  ``warning``); more warnings do not re-alert. A drift detection short of
  the evidence (one performance monitor, or a distribution test) sends an
  ``alert`` (level ``drift``), at most one per ``cooldown_events``. Only
  enough drift evidence moves to ``drift``.
  Going back to ``stable`` needs ``clear_after`` events without any detection,
  so the state does not flap around a threshold.
- **Cooldown**: after a ``retrain`` request (or a model change), no further
  ``retrain`` for ``cooldown_events`` events; drift seen meanwhile is only
  alerted, at most once per cooldown. Drift evidence that is still there
  after the cooldown (the retrain failed, or its candidate was not promoted)
  asks for a retrain again.
- **Rollback watch**: after a promotion, :meth:`start_watch` compares the live
  loss of the new model with a reference: the old model's loss on the same
  events when the records carry a shadow prediction, else the old model's
  recent loss before the promotion. After ``watch_min_events`` events, if the
  new model's mean loss exceeds the reference by more than ``rollback_margin``
  (relative) and by ``z`` standard errors, it requests a ``rollback`` to the
  old version. After ``watch_events`` events without that, the watch passes.

>>> from online_models.drift.records import Detection
>>> pol = DriftPolicy(min_evidence=2, evidence_window=1000, cooldown_events=5000)
>>> d1 = Detection("adwin:logloss", "logloss", "drift", 0.5, 0.001, 900, 1, 2, 100)
>>> [r.action for r in pol.step(100, [d1])], pol.state
(['alert'], 'warning')
>>> d2 = Detection("page_hinkley:logloss", "logloss", "drift", 120.0, 100.0, 500, 1, 3, 400)
>>> [(r.action, r.level) for r in pol.step(400, [d2])], pol.state
([('retrain', 'drift')], 'drift')
>>> pol.step(900, [d1, d2])  # in drift and cooling down: nothing new
[]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from online_models.drift.records import Detection, Request

STATES = ("stable", "warning", "drift")


@dataclass
class RollbackWatch:
    """Live comparison of a newly promoted model with the one it replaced (explicit, JSON-able state)."""

    new_version: str
    old_version: str | None
    #: the old model's mean loss before the promotion (used when no shadow loss is given)
    baseline_loss: float | None
    started_at: int
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    n_paired: int = 0
    paired_old_sum: float = 0.0

    def update(self, loss_new: float, loss_old: float | None = None) -> None:
        self.n += 1
        delta = loss_new - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (loss_new - self.mean)
        if loss_old is not None and math.isfinite(loss_old):
            self.n_paired += 1
            self.paired_old_sum += loss_old

    @property
    def reference(self) -> float | None:
        """The paired old-model loss when shadow losses came in, else the pre-promotion baseline."""
        if self.n_paired >= max(1, self.n // 2):
            return self.paired_old_sum / self.n_paired
        return self.baseline_loss

    @property
    def stderr(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n > 1 else math.inf


class DriftPolicy:
    """Turns detections into requests. The constructor's arguments are the whole configuration."""

    def __init__(
        self,
        min_evidence: int = 2,
        evidence_window: int = 5000,
        cooldown_events: int = 20_000,
        clear_after: int = 10_000,
        alert_on_warning: bool = True,
        rollback_margin: float = 0.02,
        rollback_z: float = 2.0,
        watch_min_events: int = 2000,
        watch_events: int = 20_000,
    ) -> None:
        if min_evidence < 1:
            raise ValueError(f"min_evidence must be >= 1, got {min_evidence}")
        for k, v in (
            ("evidence_window", evidence_window),
            ("cooldown_events", cooldown_events),
            ("clear_after", clear_after),
            ("watch_min_events", watch_min_events),
            ("watch_events", watch_events),
        ):
            if v < 0:
                raise ValueError(f"{k} must be >= 0, got {v}")
        self.min_evidence, self.evidence_window = min_evidence, evidence_window
        self.cooldown_events, self.clear_after = cooldown_events, clear_after
        self.alert_on_warning = alert_on_warning
        self.rollback_margin, self.rollback_z = rollback_margin, rollback_z
        self.watch_min_events, self.watch_events = watch_min_events, watch_events
        self.reset()

    def reset(self) -> None:
        self.state = "stable"
        self._evidence: deque[tuple[int, Detection]] = deque()
        self._last_detection: int | None = None
        self._last_retrain: int | None = None
        self._last_cooldown_alert: int | None = None
        self._last_drift_alert: int | None = None
        self.watch: RollbackWatch | None = None

    # ------------------------------------------------------------------ drift
    def in_cooldown(self, index: int) -> bool:
        return self._last_retrain is not None and index - self._last_retrain < self.cooldown_events

    def step(self, index: int, detections: Iterable[Detection] = (), model_version: str | None = None) -> list[Request]:
        """Advance to event ``index`` with the detections it caused; returns the requests to carry out."""
        detections = list(detections)
        if detections:
            self._last_detection = index
            self._evidence.extend((index, d) for d in detections)
        while self._evidence and index - self._evidence[0][0] > self.evidence_window:
            self._evidence.popleft()
        if (
            self.state != "stable"
            and self._last_detection is not None
            and index - self._last_detection >= self.clear_after
        ):
            self.state = "stable"  # hysteresis: only a long quiet spell clears the state
        if not detections:
            return []

        evidence = [d for _, d in self._evidence]
        drift_perf = {d.detector: d for d in evidence if d.level == "drift" and d.family == "performance"}
        drift_any = {d.detector: d for d in evidence if d.level == "drift"}
        strongest = tuple(
            sorted(
                drift_perf.values() or drift_any.values() or detections,
                key=lambda d: (d.level != "drift", d.family != "performance"),
            )
        )
        version = model_version or strongest[0].model_version

        if len(drift_perf) >= self.min_evidence:
            persists = self.state == "drift"
            self.state = "drift"
            if not self.in_cooldown(index):
                # a new episode, or drift that outlived the cooldown (the retrain failed or was not promoted)
                self._last_retrain = index
                why = f"{len(drift_perf)} performance monitors detect drift ({', '.join(sorted(drift_perf))})"
                return [
                    Request(
                        "retrain",
                        why + (" that persists after the cooldown" if persists else ""),
                        strongest,
                        version,
                        index=index,
                    )
                ]
            return [] if persists else self._cooldown_alert(index, strongest, version)
        if self.state == "drift":
            return []  # already acted on this episode; hysteresis keeps it until a quiet spell
        fresh = [d for d in detections if d.level == "drift"]
        if fresh:
            # drift short of the evidence for a retrain (one performance monitor, or a distribution test):
            # alert, at most once per cooldown
            self.state = "warning"
            if self._last_drift_alert is not None and index - self._last_drift_alert < self.cooldown_events:
                return []
            self._last_drift_alert = index
            perf = [d for d in fresh if d.family == "performance"]
            why = (
                f"early evidence: {len(drift_perf)}/{self.min_evidence} performance monitors detect drift"
                if perf
                else "distribution shift (the model may still be right): "
                + ", ".join(sorted({d.detector for d in fresh}))
            )
            return [Request("alert", why, tuple(perf or fresh), version, index=index)]
        if self.state == "stable":
            self.state = "warning"  # hysteresis: one warning alert per episode
            if self.alert_on_warning:
                return [
                    Request(
                        "alert",
                        "warning: " + ", ".join(sorted({d.detector for d in detections})),
                        tuple(detections),
                        version,
                        index=index,
                        level="warning",
                    )
                ]
        return []

    def _cooldown_alert(self, index: int, dets: tuple[Detection, ...], version: str | None) -> list[Request]:
        if self._last_cooldown_alert is not None and index - self._last_cooldown_alert < self.cooldown_events:
            return []
        self._last_cooldown_alert = index
        return [
            Request(
                "alert",
                "drift detected during the cooldown after a retrain: not retraining again yet",
                dets,
                version,
                index=index,
            )
        ]

    def on_model_changed(self, index: int) -> None:
        """A new model serves (promotion or rollback): old evidence is about the old model; cool down."""
        self._evidence.clear()
        self.state = "stable"
        self._last_retrain = index

    # ------------------------------------------------------------------ rollback watch
    def start_watch(self, index: int, new_version: str, old_version: str | None, baseline_loss: float | None) -> None:
        self.on_model_changed(index)
        self.watch = RollbackWatch(new_version, old_version, baseline_loss, index)

    def observe_loss(self, index: int, loss_new: float, loss_old: float | None = None) -> list[Request]:
        """Feed the live loss of the serving model (and the old model's shadow loss, when known)."""
        w = self.watch
        if w is None:
            return []
        w.update(loss_new, loss_old)
        ref = w.reference
        if w.n >= self.watch_min_events and ref is not None:
            excess = w.mean - ref
            if excess > self.rollback_margin * ref and excess > self.rollback_z * w.stderr:
                self.watch = None
                self.on_model_changed(index)
                return [
                    Request(
                        "rollback",
                        f"live logloss of {w.new_version} is {w.mean:.4f} vs {ref:.4f} "
                        f"for {w.old_version} over {w.n} events (+{excess / ref:.1%})",
                        (),
                        w.new_version,
                        target_version=w.old_version,
                        index=index,
                        metrics={
                            "live_logloss_new": w.mean,
                            "reference_logloss": ref,
                            "stderr": w.stderr,
                            "events": float(w.n),
                        },
                    )
                ]
        if w.n >= self.watch_events:
            self.watch = None  # passed: the caller sees watch is None and records it
        return []

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "evidence": [[i, d.to_dict()] for i, d in self._evidence],
            "last_detection": self._last_detection,
            "last_retrain": self._last_retrain,
            "last_cooldown_alert": self._last_cooldown_alert,
            "last_drift_alert": self._last_drift_alert,
            "watch": None
            if self.watch is None
            else {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in vars(self.watch).items()
            },
        }

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        if s["state"] not in STATES:
            raise ValueError(f"bad policy state {s['state']!r}; allowed: {', '.join(STATES)}")
        self.state = s["state"]
        self._evidence = deque((int(i), Detection.from_dict(d)) for i, d in s["evidence"])
        self._last_detection, self._last_retrain = s["last_detection"], s["last_retrain"]
        self._last_cooldown_alert = s["last_cooldown_alert"]
        self._last_drift_alert = s.get("last_drift_alert")
        self.watch = None if s["watch"] is None else RollbackWatch(**s["watch"])
