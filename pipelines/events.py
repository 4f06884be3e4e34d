"""The event contracts: v1 labelled events (``reloop.events``) and v2 impressions + feedback.

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
>>> parse_event(b'[' * 20_000).reason
'too deeply nested: JSON depth 20000 > 16'
>>> parse_event(b'{"event_id": "' + bytes([255]) + b'"}').reason[:13]
'invalid UTF-8'

Hostile bytes are screened before any JSON parser sees them (:func:`decode_json`):
strict UTF-8, then a nesting-depth bound computed by a linear scan (deep nesting
crashes pyarrow's JSON reader and makes Python's raise ``RecursionError``).
Context keys share no name with a column of the event table, a feature or an
example (:func:`reserved_name`): such a record is rejected, never renamed.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
#: Deepest accepted JSON nesting. The contract needs 2 (the event, its context); 16 leaves room for the
#: contract's own reasons ("context.x: must be a string...") while no parser ever recurses far.
MAX_JSON_DEPTH = 16
#: Context values are stored in int64 columns; a larger integer is rejected, not overflowed.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

FIELDS = ("event_id", "ts", "user_id", "item_id", "label", "context")
REQUIRED = FIELDS[:-1]

ContextValue = str | int | float | bool | None


def _wire(fields: dict[str, Any], context: dict[str, ContextValue] | None = None, **optional: Any) -> bytes:
    """The wire form of every contract's record: compact JSON, key order fixed; an optional field only
    when it is not None, the context (last) only when it is not empty.

    >>> _wire({"impression_id": "i1", "ts": 5}, position=0, value=None, context={})
    b'{"impression_id":"i1","ts":5,"position":0}'
    """
    d = {**fields, **{k: v for k, v in optional.items() if v is not None}}
    if context:
        d["context"] = context
    return json.dumps(d, separators=(",", ":")).encode()


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
        return _wire(
            {
                "event_id": self.event_id,
                "ts": self.ts,
                "user_id": self.user_id,
                "item_id": self.item_id,
                "label": self.label,
            },
            context=self.context,
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was refused; ``raw`` keeps the original bytes for the DLQ."""

    reason: str
    raw: bytes

    def __bool__(self) -> bool:  # a rejection is falsy, an Event truthy
        return False


#: names a context key may not take: the event table's columns, its Kafka origin, every feature and
#: example column the feature job writes (see :mod:`pipelines.aggregates`), and the old rename prefix
_RESERVED_EXACT = frozenset(
    {"event_id", "ts", "user_id", "item_id", "label", "context", "event_timestamp", "user_last_items"}
)
_RESERVED_PATTERN = re.compile(r"^(kafka_|context_|ctx_)|^(user|item)_((imp|pos|ctr)_\w+|secs_since_last)$")


def reserved_name(name: str) -> bool:
    """True if a context key would collide with a column the pipeline owns.

    >>> reserved_name("user_ctr_7d"), reserved_name("ts"), reserved_name("hour"), reserved_name("user_age")
    (True, True, False, False)
    """
    return name in _RESERVED_EXACT or _RESERVED_PATTERN.search(name) is not None


def json_depth(raw: bytes) -> int:
    """Deepest ``{``/``[`` nesting of JSON text, ignoring brackets inside strings; linear time.

    Cheap when the text has few brackets (their count bounds the depth). The string mask follows the
    parser's own reading up to the first syntax error, so it bounds how deep any parser recurses.

    >>> json_depth(b'{"a": [1, {"b": "[[[["}]}'), json_depth(b'"x"'), json_depth(b'[' * 50)
    (3, 0, 50)
    """
    openers = raw.count(b"{") + raw.count(b"[")
    if openers <= MAX_JSON_DEPTH:
        return openers if openers < 2 else _scan_depth(raw)
    return _scan_depth(raw)


def _scan_depth(raw: bytes) -> int:
    a = np.frombuffer(raw, np.uint8)
    if len(a) == 0:
        return 0
    idx = np.arange(len(a))
    # a quote is escaped iff an odd run of backslashes precedes it
    last_plain = np.maximum.accumulate(np.where(a != 0x5C, idx, -1))
    run_before = np.empty(len(a), np.int64)
    run_before[0] = 0
    run_before[1:] = idx[:-1] - last_plain[:-1]
    quote = (a == 0x22) & (run_before % 2 == 0)
    in_string = (np.cumsum(quote) % 2 == 1) & ~quote
    step = np.where(in_string, 0, (a == 0x7B).astype(np.int64) + (a == 0x5B) - (a == 0x7D) - (a == 0x5D))
    return max(0, int(np.cumsum(step).max()))


def decode_json(raw: bytes) -> tuple[Any, str]:
    """``(value, "")`` or ``(None, reason)``: strict UTF-8, a depth bound, then ``json.loads``; never raises.

    The one safe entry to JSON for every wire contract (events, impressions, feedback).
    """
    try:
        text = raw.decode("utf-8")  # strict: invalid bytes never reach a parser or an Arrow string
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8: {e}"
    # the bracket count bounds the depth: only a text with many brackets needs the scan
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH:
        depth = json_depth(raw)
        if depth > MAX_JSON_DEPTH:
            return None, f"too deeply nested: JSON depth {depth} > {MAX_JSON_DEPTH}"
    try:
        return json.loads(text), ""
    except ValueError as e:
        return None, f"malformed JSON: {e}"
    except Exception as e:  # noqa: BLE001  (a record must never raise out of the parser)
        return None, f"malformed JSON: {type(e).__name__}: {e}"


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
        if not isinstance(k, str) or reserved_name(k):
            return None, f"context.{k}: name collides with a column of the pipeline (event, feature or Kafka)"
        if isinstance(x, int) and not isinstance(x, bool) and not INT64_MIN <= x <= INT64_MAX:
            return None, f"context.{k}: integer out of the int64 range"
        if isinstance(x, float) and not math.isfinite(x):
            return None, f"context.{k}: must be finite, got {x}"
        if isinstance(x, str) and len(x) > MAX_CONTEXT_STRING:
            return None, f"context.{k}: string longer than {MAX_CONTEXT_STRING}"
        if not isinstance(x, (str, int, float, bool)) and x is not None:
            return None, f"context.{k}: must be a string, number, boolean or null, got {type(x).__name__}"
    return v, ""


def _never_raises(parse):
    """Last resort of a parser of the wire: an unexpected error is a rejection, never an exception."""

    @functools.wraps(parse)
    def wrapper(raw, **kw):
        try:
            return parse(raw, **kw)
        except Exception as e:  # noqa: BLE001  (one record never stops the stream)
            return Rejection(f"parser error: {type(e).__name__}: {str(e)[:200]}", _raw_bytes(raw))

    return wrapper


def _raw_bytes(raw: bytes | str | None) -> bytes:
    if raw is None or not isinstance(raw, (bytes, bytearray, memoryview, str)):
        return b""
    return raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)


def _decode_object(raw: bytes | str | None) -> dict | Rejection:
    """Bytes -> a JSON object, or the rejection (size, JSON, top-level type); the first step of every
    wire contract's parser. JSON goes through :func:`decode_json` (strict UTF-8, a nesting bound)."""
    if raw is None:
        return Rejection("empty record", b"")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return Rejection(f"not bytes: {type(raw).__name__}", b"")
    raw = bytes(raw)
    if len(raw) > MAX_PAYLOAD_BYTES:
        return Rejection(f"oversized payload: {len(raw)} bytes > {MAX_PAYLOAD_BYTES}", raw)
    d, why = decode_json(raw)
    if why:
        return Rejection(why, raw)
    if not isinstance(d, dict):
        return Rejection(f"not a JSON object: {type(d).__name__}", raw)
    return d


def _decode_record(
    raw: bytes | str | None, required: tuple[str, ...], known: tuple[str, ...]
) -> tuple[dict, bytes] | Rejection:
    """The first steps of every contract's parser: ``(object, raw bytes)`` when the record decodes
    (:func:`_decode_object`) with its ``required`` fields and none outside ``known``; else the rejection."""
    d = _decode_object(raw)
    if isinstance(d, Rejection):
        return d
    raw = _raw_bytes(raw)
    missing = [f for f in required if f not in d]
    if missing:
        return Rejection(f"missing field(s): {', '.join(missing)}", raw)
    unknown = sorted(set(d) - set(known))
    if unknown:
        return Rejection(f"unknown field(s): {', '.join(unknown)}", raw)
    return d, raw


def _id_reason(name: str, v: Any) -> str:
    return f"{name}: must be a non-empty string (<= {MAX_ID_CHARS} chars) or integer, got {type(v).__name__}"


def _ids(
    d: dict, raw: bytes, names: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, str | None] | Rejection:
    """The id fields ``names`` as strings (an ``optional`` one absent or null is None), or the rejection
    of the first bad one."""
    ids: dict[str, str | None] = {}
    for name in names:
        if name in optional and d.get(name) is None:
            ids[name] = None
            continue
        ids[name] = _id(d, name)
        if ids[name] is None:
            return Rejection(_id_reason(name, d[name]), raw)
    return ids


def _ts(v: Any, raw: bytes, now_ms: int | None) -> int | Rejection:
    """An event time: a positive integer of epoch ms, not further ahead of ``now_ms`` than MAX_FUTURE_MS."""
    if isinstance(v, bool) or not isinstance(v, int):
        return Rejection(f"ts: must be an integer (epoch ms), got {type(v).__name__}", raw)
    if v <= 0:
        return Rejection(f"ts: must be positive epoch ms, got {v}", raw)
    ceiling = min(MAX_TS_MS, (now_ms if now_ms is not None else int(time.time() * 1000)) + MAX_FUTURE_MS)
    if v > ceiling:
        return Rejection(f"ts: {v} is in the far future (> {ceiling})", raw)
    return v


@_never_raises
def parse_event(raw: bytes | str, *, now_ms: int | None = None) -> Event | Rejection:
    """Parse and validate one wire record; never raises.

    ``now_ms`` is the wall clock used for the far-future check (defaults to now).
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if raw is None:
        return Rejection("empty record", b"")
    return _parse_event(bytes(raw), now_ms)


def _parse_event(raw: bytes, now_ms: int | None) -> Event | Rejection:
    got = _decode_record(raw, REQUIRED, FIELDS)
    if isinstance(got, Rejection):
        return got
    d, raw = got
    ids = _ids(d, raw, ("event_id", "user_id", "item_id"))
    if isinstance(ids, Rejection):
        return ids
    ts = _ts(d["ts"], raw, now_ms)
    if isinstance(ts, Rejection):
        return ts
    label = d["label"]
    if isinstance(label, bool) or label not in (0, 1) or isinstance(label, float):
        return Rejection(f"label: must be 0 or 1, got {label!r}", raw)
    context, why = _context(d.get("context"))
    if context is None:
        return Rejection(why, raw)
    return Event(ids["event_id"], ts, ids["user_id"], ids["item_id"], int(label), context)


# ---------------------------------------------------------------------------------------------------------
# Contract v2: impressions and feedback as two streams, joined later by ``impression_id``.
#
# ``impression`` on ``reloop.impressions`` (key = user id)::
#
#     {"impression_id": "imp-17", "ts": 881250949000, "user_id": "196", "item_id": "242",
#      "request_id": "r-9", "position": 3, "context": {"device": "web"}}
#
# ``feedback`` on ``reloop.feedback`` (key = impression id)::
#
#     {"impression_id": "imp-17", "ts": 881251949000, "kind": "click", "value": 1.0}
#
# A v1 labelled event is an impression with immediate feedback (:func:`split_v1`): its ``event_id`` becomes
# the impression id, and a positive label a ``click`` at the same ``ts``.

IMPRESSION_FIELDS = ("impression_id", "ts", "user_id", "item_id", "request_id", "position", "context")
IMPRESSION_REQUIRED = IMPRESSION_FIELDS[:4]
FEEDBACK_FIELDS = ("impression_id", "ts", "kind", "value")
FEEDBACK_REQUIRED = FEEDBACK_FIELDS[:3]
#: the feedback kinds accepted unless a caller configures more (e.g. ``("click", "purchase")``)
FEEDBACK_KINDS = ("click",)
#: the largest slate position accepted (a slate has at most 10,000 candidates)
MAX_POSITION = 10_000

#: JSON Schemas (draft 2020-12) of the v2 wire records; ``$id`` carries the contract version.
IMPRESSION_SCHEMA_V2: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://reloop.dev/schemas/impression/v2.json",
    "title": "reloop impression (contract v2)",
    "type": "object",
    "additionalProperties": False,
    "required": list(IMPRESSION_REQUIRED),
    "properties": {
        "impression_id": {"$ref": "#/$defs/id"},
        "ts": {"$ref": "#/$defs/ts"},
        "user_id": {"$ref": "#/$defs/id"},
        "item_id": {"$ref": "#/$defs/id"},
        "request_id": {"$ref": "#/$defs/id"},
        "position": {"type": "integer", "minimum": 0, "maximum": MAX_POSITION},
        "context": {
            "type": "object",
            "maxProperties": MAX_CONTEXT_FIELDS,
            "additionalProperties": {"type": ["string", "number", "boolean", "null"], "maxLength": MAX_CONTEXT_STRING},
        },
    },
    "$defs": {
        "id": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS}, {"type": "integer"}]},
        "ts": {"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_TS_MS},
    },
}
FEEDBACK_SCHEMA_V2: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://reloop.dev/schemas/feedback/v2.json",
    "title": "reloop feedback (contract v2)",
    "type": "object",
    "additionalProperties": False,
    "required": list(FEEDBACK_REQUIRED),
    "properties": {
        "impression_id": {"$ref": "#/$defs/id"},
        "ts": {"$ref": "#/$defs/ts"},
        "kind": {"enum": list(FEEDBACK_KINDS)},
        "value": {"type": "number"},
    },
    "$defs": IMPRESSION_SCHEMA_V2["$defs"],
}


def feedback_schema(kinds: tuple[str, ...] = FEEDBACK_KINDS) -> dict[str, Any]:
    """The feedback schema for a deployment that configures conversion kinds besides ``click``."""
    return {**FEEDBACK_SCHEMA_V2, "properties": {**FEEDBACK_SCHEMA_V2["properties"], "kind": {"enum": list(kinds)}}}


SCHEMAS: dict[str, dict[str, Any]] = {"impression/v2": IMPRESSION_SCHEMA_V2, "feedback/v2": FEEDBACK_SCHEMA_V2}


@dataclass(frozen=True, slots=True)
class Impression:
    """One item shown to one user; its label arrives later as :class:`Feedback` (or never)."""

    impression_id: str
    ts: int
    user_id: str
    item_id: str
    request_id: str | None = None
    position: int | None = None
    context: dict[str, ContextValue] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return _wire(
            {"impression_id": self.impression_id, "ts": self.ts, "user_id": self.user_id, "item_id": self.item_id},
            request_id=self.request_id,
            position=self.position,
            context=self.context,
        )


@dataclass(frozen=True, slots=True)
class Feedback:
    """An outcome of an earlier impression: a click (or a configured conversion kind) at ``ts``."""

    impression_id: str
    ts: int
    kind: str = "click"
    value: float | None = None

    def to_json(self) -> bytes:
        return _wire({"impression_id": self.impression_id, "ts": self.ts, "kind": self.kind}, value=self.value)


def _utf8_ok(*strings: str | None) -> bool:
    """JSON may escape lone surrogates (``"\\ud800"``), which Arrow strings and Kafka keys cannot hold."""
    try:
        for s in strings:
            if s is not None:
                s.encode()
    except UnicodeEncodeError:
        return False
    return True


@_never_raises
def parse_impression(raw: bytes | str | None, *, now_ms: int | None = None) -> Impression | Rejection:
    """Validate one ``impression`` record (contract v2, :data:`IMPRESSION_SCHEMA_V2`); never raises.

    >>> parse_impression(b'{"impression_id": "i1", "ts": 5, "user_id": 7, "item_id": "x", "position": 2}')
    Impression(impression_id='i1', ts=5, user_id='7', item_id='x', request_id=None, position=2, context={})
    >>> parse_impression(b'{"impression_id": "i1", "ts": 5, "user_id": 7, "item_id": "x", "label": 1}').reason
    'unknown field(s): label'
    """
    got = _decode_record(raw, IMPRESSION_REQUIRED, IMPRESSION_FIELDS)
    if isinstance(got, Rejection):
        return got
    d, raw = got
    ids = _ids(d, raw, ("impression_id", "user_id", "item_id", "request_id"), optional=("request_id",))
    if isinstance(ids, Rejection):
        return ids
    ts = _ts(d["ts"], raw, now_ms)
    if isinstance(ts, Rejection):
        return ts
    position = d.get("position")
    if position is not None and (
        isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= MAX_POSITION
    ):
        return Rejection(f"position: must be an integer in [0, {MAX_POSITION}], got {position!r}", raw)
    context, why = _context(d.get("context"))
    if context is None:
        return Rejection(why, raw)
    if not _utf8_ok(*ids.values(), *(k for k in context), *(v for v in context.values() if isinstance(v, str))):
        return Rejection("invalid unicode: a lone surrogate escape in an id or context string", raw)
    return Impression(ids["impression_id"], ts, ids["user_id"], ids["item_id"], ids["request_id"], position, context)


@_never_raises
def parse_feedback(
    raw: bytes | str | None, *, now_ms: int | None = None, kinds: tuple[str, ...] = FEEDBACK_KINDS
) -> Feedback | Rejection:
    """Validate one ``feedback`` record (contract v2, :data:`FEEDBACK_SCHEMA_V2`); never raises.

    Whether its impression exists is the join's business (an orphan goes to the DLQ there).

    >>> parse_feedback(b'{"impression_id": "i1", "ts": 9, "kind": "click"}')
    Feedback(impression_id='i1', ts=9, kind='click', value=None)
    >>> parse_feedback(b'{"impression_id": "i1", "ts": 9, "kind": "like"}').reason
    "kind: must be one of click, got 'like'"
    """
    got = _decode_record(raw, FEEDBACK_REQUIRED, FEEDBACK_FIELDS)
    if isinstance(got, Rejection):
        return got
    d, raw = got
    iid = _id(d, "impression_id")
    if iid is None or not _utf8_ok(iid):
        return Rejection(_id_reason("impression_id", d["impression_id"]), raw)
    ts = _ts(d["ts"], raw, now_ms)
    if isinstance(ts, Rejection):
        return ts
    kind = d["kind"]
    if not isinstance(kind, str) or kind not in kinds:
        return Rejection(f"kind: must be one of {', '.join(kinds)}, got {kind!r}", raw)
    value = d.get("value")
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    ):
        return Rejection(f"value: must be a finite number, got {value!r}", raw)
    return Feedback(iid, ts, kind, None if value is None else float(value))


def split_v1(event: Event) -> tuple[Impression, Feedback | None]:
    """A v1 labelled event as v2: an impression, plus a click at the same instant when the label is 1.

    >>> imp, fb = split_v1(Event("e1", 10, "u", "i", 1))
    >>> imp.impression_id, fb
    ('e1', Feedback(impression_id='e1', ts=10, kind='click', value=None))
    """
    imp = Impression(event.event_id, event.ts, event.user_id, event.item_id, context=dict(event.context))
    return imp, (Feedback(event.event_id, event.ts, "click") if event.label == 1 else None)


@_never_raises
def parse_impression_or_v1(
    raw: bytes | str | None, *, now_ms: int | None = None
) -> tuple[Impression, Feedback | None] | Rejection:
    """What the impressions topic accepts: a v2 impression, or a v1 labelled event (impression + feedback).

    A record with a ``label`` (or an ``event_id`` and no ``impression_id``) is read as v1, so existing
    producers and topics keep working; its rejection reasons are then the v1 contract's.
    """
    d = _decode_object(raw)
    if isinstance(d, Rejection):
        return d
    if "label" in d or ("event_id" in d and "impression_id" not in d):
        ev = parse_event(raw, now_ms=now_ms)
        if isinstance(ev, Rejection):
            return ev
        if not _utf8_ok(ev.event_id, ev.user_id, ev.item_id):
            return Rejection("invalid unicode: a lone surrogate escape in an id or context string", _raw_bytes(raw))
        return split_v1(ev)
    imp = parse_impression(raw, now_ms=now_ms)
    return imp if isinstance(imp, Rejection) else (imp, None)
