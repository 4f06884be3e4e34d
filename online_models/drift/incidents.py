"""Incidents: the alerts of one shift, grouped, with what was done about them.

Detectors fire many times for one change (several monitors, repeated after each cooldown). On-call wants
one page per shift: an :class:`Incident` opens with the first alert, collects the alerts that follow
within ``gap_events`` served events of the previous one, records the actions taken meanwhile (retrain,
promotion, rollback) and resolves once ``gap_events`` events pass without an alert (or a promoted
candidate is kept that long). Pure logic over plain records: the monitor loop uses :class:`IncidentTracker`
live (one opening message, then updates), the report uses :func:`group_incidents` after the run.

>>> t = IncidentTracker(gap_events=100)
>>> t.observe_alert({"at_event": 10, "ts": 1, "summary": "a"})[0], t.observe_alert({"at_event": 50, "ts": 2})[0]
('opened', 'updated')
>>> t.tick(200)[0].status, t.observe_alert({"at_event": 300, "ts": 3})[0]
('resolved', 'opened')
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

#: deployer events that count as actions of the incident they fall in
ACTION_PREFIXES = (
    "retrain submitted",
    "retrain candidate",
    "retrain failed",
    "retrain skipped",
    "retrain dropped",
    "rollback",
    "gate",
)


@dataclass
class Incident:
    id: int
    start_ts: int | None
    start_event: int
    last_event: int
    status: str = "open"  # open | resolved
    alerts: int = 0
    evidence: list[str] = field(default_factory=list)  # distinct detectors / summaries
    actions: list[dict[str, Any]] = field(default_factory=list)
    resolution: str | None = None
    end_event: int | None = None
    end_ts: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class IncidentTracker:
    """Groups a stream of alerts into incidents (see the module docstring)."""

    def __init__(self, gap_events: int = 10_000) -> None:
        self.gap_events = gap_events
        self.incidents: list[Incident] = []

    @property
    def open(self) -> Incident | None:
        return self.incidents[-1] if self.incidents and self.incidents[-1].status == "open" else None

    def observe_alert(self, alert: dict[str, Any]) -> tuple[str, Incident]:
        """Add one alert; returns ("opened" | "updated", its incident)."""
        at = int(alert.get("at_event", 0))
        self.tick(at)
        inc = self.open
        verb = "updated"
        if inc is None:
            inc = Incident(len(self.incidents) + 1, alert.get("ts"), at, at)
            self.incidents.append(inc)
            verb = "opened"
        inc.alerts += 1
        inc.last_event = at
        for ev in alert.get("detectors") or [alert.get("summary", "")]:
            if ev and ev not in inc.evidence and len(inc.evidence) < 20:
                inc.evidence.append(ev)
        return verb, inc

    def observe_action(self, action: dict[str, Any]) -> Incident | None:
        """Attach a deployment action to the open incident (None if there is none)."""
        self.tick(int(action.get("at_event", 0)))
        inc = self.open
        if inc is not None:
            inc.actions.append(
                {
                    k: action.get(k)
                    for k in ("what", "at_event", "ts", "version", "kind", "promote")
                    if action.get(k) is not None
                }
            )
        return inc

    def tick(self, at_event: int, ts: int | None = None) -> list[Incident]:
        """Resolve the open incident once ``gap_events`` events passed without an alert; returns it."""
        inc = self.open
        if inc is None or at_event - inc.last_event < self.gap_events:
            return []
        inc.status = "resolved"
        inc.end_event = inc.last_event + self.gap_events
        inc.end_ts = ts
        promoted = [a for a in inc.actions if a.get("what") == "retrain candidate promoted"]
        rolled = [
            a
            for a in inc.actions
            if str(a.get("what", "")).startswith("rollback") and a.get("what") != "rollback declined"
        ]
        inc.resolution = (
            f"quiet for {self.gap_events} events after "
            + (f"promoting {promoted[-1].get('version')}" if promoted else "the last alert")
            + (" (rolled back)" if rolled else "")
        )
        return [inc]

    def close(self, at_event: int) -> None:
        """End of the stream: an incident still open stays open, with that said."""
        self.tick(at_event)
        if self.open is not None:
            self.open.resolution = "still open at the end of the stream"


def group_incidents(
    alerts: Iterable[dict[str, Any]],
    actions: Iterable[dict[str, Any]] = (),
    gap_events: int = 10_000,
    end_event: int | None = None,
) -> list[dict[str, Any]]:
    """Incidents of a finished run from its alerts and deployer events (both with ``at_event``)."""
    t = IncidentTracker(gap_events)
    items = [(int(a.get("at_event", 0)), 0, a) for a in alerts]
    items += [
        (int(e.get("at_event", 0)), 1, e)
        for e in actions
        if str(e.get("what", "")).startswith(ACTION_PREFIXES) and not _routine(e)
    ]
    for _, kind, item in sorted(items, key=lambda x: (x[0], x[1])):
        if kind == 0:
            t.observe_alert(item)
        else:
            t.observe_action(item)
    last = max([i[0] for i in items], default=0) if end_event is None else end_event
    t.close(last)
    return [i.to_dict() for i in t.incidents]


def _routine(e: dict[str, Any]) -> bool:
    """A routine refresh decision is no incident action."""
    return e.get("what") == "gate" and e.get("kind") == "refresh"
