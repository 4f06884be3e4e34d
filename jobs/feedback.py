"""The feedback guard: only outcomes of impressions ``/score`` issued, once each, within per-source caps.

The error-compensation memory adapts within seconds to every outcome it is
given, which makes it the easiest part of the system to steer: 5,000 fake
label-0 outcomes for one (user, item) once moved its score from .516 to .209,
and the neighbours' with it. The guard stands between ``/feedback`` and the
memory (and the memory's rebuild buffer, which would carry the poison into the
next model):

1. **Issued**: an outcome names an impression id that ``/score`` issued
   (:class:`Impressions`: bounded, with a time to live); anything else is
   refused. Impression ids are random, so a client cannot guess another's.
2. **Once**: one outcome per impression; a repeat with the same label is an
   idempotent no-op (``duplicate``), with another label a conflict.
3. **Caps**: per (user, item) pair, per user and per item, at most so many
   accepted outcomes per sliding window (:class:`GuardConfig`). With the
   memory's shrinkage ``s`` and weight ``lam``, ``k`` outcomes can move a score
   by at most ``lam * k / (k + s)``; with the defaults (2 per pair and window,
   ``lam`` .6, ``s`` 10) a flood on one pair moves it by at most .10 per window.
4. **Lockstep** (after CopyCatch, Beutel et al., WWW 2013): bursts of
   identical feedback (same item, same label) from few sources within a short
   window raise one alert per item and label through the hooks; the caps keep
   the burst's effect bounded meanwhile.

>>> g = FeedbackGuard(GuardConfig(max_per_pair=2))
>>> imp = g.impressions.issue("u", "i", payload=None)
>>> g.admit(imp, 0, client="c").accepted, g.admit(imp, 0, client="c").reason
(True, 'duplicate')
>>> [g.admit(g.impressions.issue("u", "i", payload=None), 0, client="c").reason for _ in range(2)]
['', 'cap: (user, item) pair at 2 outcomes per 60s']
>>> g.admit("never-issued", 1, client="c").reason
'unknown impression'
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GuardConfig", "Impression", "Impressions", "Verdict", "FeedbackGuard", "LockstepDetector"]


@dataclass(frozen=True)
class GuardConfig:
    """The guard's whole configuration."""

    window_s: float = 60.0  # sliding window of the caps
    max_per_pair: int = 2  # accepted outcomes per (user, item) and window
    max_per_user: int = 60
    max_per_item: int = 600
    impression_ttl_s: float = 24 * 3600.0
    max_impressions: int = 500_000  # issued impressions remembered (oldest forgotten first)
    lockstep_window_s: float = 10.0
    lockstep_min: int = 50  # identical outcomes (item, label) in the window ...
    lockstep_max_source_share: float = 0.2  # ... from at most this share of distinct clients or users
    lockstep_cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if min(self.max_per_pair, self.max_per_user, self.max_per_item, self.lockstep_min, self.max_impressions) < 1:
            raise ValueError("guard caps, lockstep_min and max_impressions must be >= 1")
        if self.window_s <= 0 or self.impression_ttl_s <= 0 or self.lockstep_window_s <= 0:
            raise ValueError("guard windows and the impression TTL must be > 0 seconds")


@dataclass
class Impression:
    """One candidate shown to one user by one ``/score`` request; ``payload`` is what the scorer needs to
    write its outcome (model version, features, memory key, base prediction)."""

    impression_id: str
    user_id: str
    item_id: str
    payload: Any
    issued_at: float
    outcome: int | None = None
    ts_ms: int = 0  # the event time it was served at (epoch ms; 0: not recorded)


class Impressions:
    """Issued impressions by id: bounded in number and in age."""

    def __init__(
        self, max_size: int = 500_000, ttl_s: float = 24 * 3600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_size, self.ttl_s, self.clock = max_size, ttl_s, clock
        self._items: collections.OrderedDict[str, Impression] = collections.OrderedDict()
        self._lock = threading.Lock()

    def issue(self, user_id: str, item_id: str, payload: Any, impression_id: str | None = None) -> str:
        iid = impression_id or secrets.token_hex(12)
        now = self.clock()
        with self._lock:
            self._items[iid] = Impression(iid, user_id, item_id, payload, now)
            self._expire(now)
        return iid

    def issue_many(self, user_id: str, item_ids: list[str], payloads: list[Any], ts_ms: int = 0) -> list[str]:
        """Ids for a slate: one random prefix per request, the candidate's index after it. ``ts_ms``: the
        event time the slate was served at (kept so its feedback is never stamped before it)."""
        prefix = secrets.token_hex(12)
        now = self.clock()
        ids = [f"{prefix}.{i}" for i in range(len(item_ids))]
        with self._lock:
            for iid, item, p in zip(ids, item_ids, payloads):
                self._items[iid] = Impression(iid, user_id, item, p, now, None, ts_ms)
            self._expire(now)
        return ids

    def _expire(self, now: float) -> None:
        while self._items and (
            len(self._items) > self.max_size or now - next(iter(self._items.values())).issued_at > self.ttl_s
        ):
            self._items.popitem(last=False)

    def get(self, impression_id: str) -> Impression | None:
        with self._lock:
            imp = self._items.get(impression_id)
            if imp is not None and self.clock() - imp.issued_at > self.ttl_s:
                return None
            return imp

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str = ""  # "" when accepted; else unknown impression / duplicate / conflict / cap: ...
    impression: Impression | None = None

    @property
    def status(self) -> int:
        """The HTTP status for a refused outcome (200 for accepted and idempotent repeats)."""
        if self.accepted or self.reason == "duplicate":
            return 200
        if self.reason == "unknown impression":
            return 404
        if self.reason.startswith("conflict"):
            return 409
        return 429


class _Window:
    """Timestamps per key within a sliding window (deques trimmed on use)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._t: dict[Any, collections.deque] = {}

    def count(self, key: Any, now: float) -> int:
        q = self._t.get(key)
        if q is None:
            return 0
        while q and now - q[0] > self.window_s:
            q.popleft()
        if not q:
            del self._t[key]
            return 0
        return len(q)

    def add(self, key: Any, now: float) -> None:
        self._t.setdefault(key, collections.deque()).append(now)

    def prune(self, now: float) -> None:
        for key in [k for k, q in self._t.items() if not q or now - q[-1] > self.window_s]:
            del self._t[key]


class LockstepDetector:
    """Bursts of identical outcomes (item, label) from few sources: CopyCatch's lockstep, in one window.

    ``update`` returns an alert dict the first time a burst is seen (then stays quiet for the cooldown).

    >>> d = LockstepDetector(window_s=10, min_count=3, max_source_share=0.5)
    >>> [bool(d.update("i", 0, "client-a", "u1", t)) for t in (0.0, 1.0, 2.0, 3.0)]
    [False, False, True, False]
    """

    def __init__(
        self, window_s: float = 10.0, min_count: int = 50, max_source_share: float = 0.2, cooldown_s: float = 300.0
    ) -> None:
        self.window_s, self.min_count = window_s, min_count
        self.max_source_share, self.cooldown_s = max_source_share, cooldown_s
        self._events: dict[tuple[str, int], collections.deque] = {}
        self._last_alert: dict[tuple[str, int], float] = {}
        self.alerts = 0

    def update(self, item_id: str, label: int, client: str, user_id: str, now: float) -> dict | None:
        key = (item_id, int(label))
        q = self._events.setdefault(key, collections.deque())
        q.append((now, client, user_id))
        while q and now - q[0][0] > self.window_s:
            q.popleft()
        if len(self._events) > 100_000:  # forget idle keys
            for k in [k for k, v in self._events.items() if not v or now - v[-1][0] > self.window_s]:
                del self._events[k]
        n = len(q)
        if n < self.min_count or now - self._last_alert.get(key, -1e18) < self.cooldown_s:
            return None
        clients = len({c for _, c, _ in q})
        users = len({u for _, _, u in q})
        if min(clients, users) / n > self.max_source_share:
            return None  # many independent sources: a popular item, not a lockstep burst
        self._last_alert[key] = now
        self.alerts += 1
        return {
            "kind": "feedback_lockstep",
            "detector": "copycatch:feedback",
            "item_id": item_id,
            "label": int(label),
            "count": n,
            "window_s": self.window_s,
            "distinct_clients": clients,
            "distinct_users": users,
            "message": f"{n} identical outcomes (item {item_id}, label {label}) within {self.window_s:g}s "
            f"from {clients} client(s) and {users} user(s)",
        }


@dataclass
class FeedbackGuard:
    """Admit an outcome or say why not; ``alert`` (e.g. ``HookDispatcher.deliver``) gets lockstep alerts."""

    config: GuardConfig = field(default_factory=GuardConfig)
    alert: Callable[[dict], Any] | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        c = self.config
        self.impressions = Impressions(c.max_impressions, c.impression_ttl_s, self.clock)
        self._pairs, self._users, self._items = _Window(c.window_s), _Window(c.window_s), _Window(c.window_s)
        self.lockstep = LockstepDetector(
            c.lockstep_window_s, c.lockstep_min, c.lockstep_max_source_share, c.lockstep_cooldown_s
        )
        self._lock = threading.Lock()
        self.stats: collections.Counter = collections.Counter()
        self._admitted = 0

    def admit(self, impression_id: str, label: int, client: str = "") -> Verdict:
        """Check one outcome; when accepted, the impression is marked answered and the caps are charged."""
        c = self.config
        alert = None
        with self._lock:
            now = self.clock()
            imp = self.impressions.get(impression_id)
            if imp is None:
                return self._refuse("unknown impression")
            if imp.outcome is not None:
                if imp.outcome == int(label):
                    return self._refuse("duplicate", imp)
                return self._refuse(f"conflict: impression already has outcome {imp.outcome}", imp)
            alert = self.lockstep.update(imp.item_id, label, client, imp.user_id, now)
            for window, key, cap, what in (
                (self._pairs, (imp.user_id, imp.item_id), c.max_per_pair, "(user, item) pair"),
                (self._users, imp.user_id, c.max_per_user, "user"),
                (self._items, imp.item_id, c.max_per_item, "item"),
            ):
                if window.count(key, now) >= cap:
                    verdict = self._refuse(f"cap: {what} at {cap} outcomes per {c.window_s:g}s", imp)
                    break
            else:
                imp.outcome = int(label)
                self._pairs.add((imp.user_id, imp.item_id), now)
                self._users.add(imp.user_id, now)
                self._items.add(imp.item_id, now)
                self.stats["accepted"] += 1
                self._admitted += 1
                if self._admitted % 10_000 == 0:
                    for w in (self._pairs, self._users, self._items):
                        w.prune(now)
                verdict = Verdict(True, "", imp)
        if alert is not None:
            self.stats["lockstep_alerts"] += 1
            if self.alert is not None:
                try:
                    self.alert(alert)
                except Exception:  # noqa: BLE001  (an alert channel failing must not fail the request)
                    self.stats["alert_failures"] += 1
        return verdict

    def _refuse(self, reason: str, imp: Impression | None = None) -> Verdict:
        self.stats["refused_" + reason.split(":")[0].replace(" ", "_")] += 1
        return Verdict(False, reason, imp)
