"""The event contract of the ``reloop.events`` topic, and its one parser.

An event is JSON on the wire (key = user id)::

    {"event_id": "ml100k-17", "ts": 881250949000, "user_id": "196",
     "item_id": "242", "label": 0, "context": {"hour": 13, "device": "web"}}

``parse_event`` never raises on bad input: it returns either an :class:`Event`
or a :class:`Rejection` naming the reason, so the caller can route the record to
the dead-letter topic.

>>> parse_event(b'{"event_id": "e1", "ts": 881250949000, "user_id": "196", "item_id": "242", "label": 1}')
Event(event_id='e1', ts=881250949000, user_id='196', item_id='242', label=1, context={})
>>> parse_event(b'{"event_id": "e1", "ts": 1, "user_id": "196", "item_id": "242", "label": 2}').reason
'label: must be 0 or 1, got 2'
>>> parse_event(b'not json').reason[:14]
'malformed JSON'
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Union

#: Largest accepted payload; bigger records go to the dead-letter topic.
MAX_PAYLOAD_BYTES = 64 * 1024
#: Longest accepted id (user, item, event).
MAX_ID_CHARS = 256
#: Most context fields per event, and longest string value.
MAX_CONTEXT_FIELDS = 64
MAX_CONTEXT_STRING = 1024
#: Events stamped further than this into the future (vs the wall clock) are rejected.
MAX_FUTURE_MS = 24 * 3600 * 1000
#: 2100-01-01 in epoch ms: a hard ceiling that does not depend on the wall clock.
MAX_TS_MS = 4_102_444_800_000

FIELDS = ("event_id", "ts", "user_id", "item_id", "label", "context")
REQUIRED = FIELDS[:-1]

ContextValue = Union[str, int, float, bool, None]


@dataclass(frozen=True, slots=True)
class Event:
    """One validated interaction: ``label`` is 1 for a click / positive outcome."""

    event_id: str
    ts: int
    user_id: str
    item_id: str
    label: int
    context: dict[str, ContextValue] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """Encode for the wire (compact, key order fixed)."""
        d: dict[str, Any] = {
            "event_id": self.event_id, "ts": self.ts, "user_id": self.user_id,
            "item_id": self.item_id, "label": self.label,
        }
        if self.context:
            d["context"] = self.context
        return json.dumps(d, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was refused; ``raw`` keeps the original bytes for the DLQ."""

    reason: str
    raw: bytes

    def __bool__(self) -> bool:  # a rejection is falsy, an Event truthy
        return False


def _id(d: dict, name: str) -> str | None:
    v = d[name]
    if isinstance(v, bool):
        return None
    if isinstance(v, int):  # numeric ids are common in datasets; their decimal form is the id
        return str(v)
    if isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS:
        return v
    return None


def _context(v: Any) -> tuple[dict[str, ContextValue] | None, str]:
    if v is None:
        return {}, ""
    if not isinstance(v, dict):
        return None, f"context: must be an object, got {type(v).__name__}"
    if len(v) > MAX_CONTEXT_FIELDS:
        return None, f"context: at most {MAX_CONTEXT_FIELDS} fields, got {len(v)}"
    for k, x in v.items():
        if isinstance(x, float) and not math.isfinite(x):
            return None, f"context.{k}: must be finite, got {x}"
        if isinstance(x, str) and len(x) > MAX_CONTEXT_STRING:
            return None, f"context.{k}: string longer than {MAX_CONTEXT_STRING}"
        if not isinstance(x, (str, int, float, bool)) and x is not None:
            return None, f"context.{k}: must be a string, number, boolean or null, got {type(x).__name__}"
    return v, ""


def parse_event(raw: bytes | str, *, now_ms: int | None = None) -> Event | Rejection:
    """Parse and validate one wire record; never raises.

    ``now_ms`` is the wall clock used for the far-future check (defaults to now).
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if raw is None:
        return Rejection("empty record", b"")
    if len(raw) > MAX_PAYLOAD_BYTES:
        return Rejection(f"oversized payload: {len(raw)} bytes > {MAX_PAYLOAD_BYTES}", raw)
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return Rejection(f"malformed JSON: {e}", raw)
    if not isinstance(d, dict):
        return Rejection(f"not a JSON object: {type(d).__name__}", raw)
    missing = [f for f in REQUIRED if f not in d]
    if missing:
        return Rejection(f"missing field(s): {', '.join(missing)}", raw)
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        return Rejection(f"unknown field(s): {', '.join(unknown)}", raw)
    ids = {}
    for name in ("event_id", "user_id", "item_id"):
        ids[name] = _id(d, name)
        if ids[name] is None:
            return Rejection(f"{name}: must be a non-empty string (<= {MAX_ID_CHARS} chars) or integer, "
                             f"got {type(d[name]).__name__}", raw)
    ts = d["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int):
        return Rejection(f"ts: must be an integer (epoch ms), got {type(ts).__name__}", raw)
    if ts <= 0:
        return Rejection(f"ts: must be positive epoch ms, got {ts}", raw)
    ceiling = min(MAX_TS_MS, (now_ms if now_ms is not None else int(time.time() * 1000)) + MAX_FUTURE_MS)
    if ts > ceiling:
        return Rejection(f"ts: {ts} is in the far future (> {ceiling})", raw)
    label = d["label"]
    if isinstance(label, bool) or label not in (0, 1) or isinstance(label, float):
        return Rejection(f"label: must be 0 or 1, got {label!r}", raw)
    context, why = _context(d.get("context"))
    if context is None:
        return Rejection(why, raw)
    return Event(ids["event_id"], ts, ids["user_id"], ids["item_id"], int(label), context)
