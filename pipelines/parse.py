"""Parse a batch of raw Kafka records into an Arrow event table plus a table of rejections.

Pure: no Beam, no Kafka. Each record goes through the one parser of the event
contract (:func:`reloop.events.parse_event`); what it accepts becomes a row of
a column-oriented table, what it rejects keeps its original bytes and the
reason, for the dead-letter topic.

Accepted rows carry where they came from (``kafka_partition``,
``kafka_offset``) so the job can order ties deterministically and the training
examples can be traced back to the log. Context fields become columns (a
context key that collides with a core column is prefixed with ``context_``);
a column whose values mix types is stored as strings.

>>> ev, bad = parse_batch([b'{"event_id":"a","ts":5,"user_id":"u","item_id":"i","label":1,"context":{"hour":3}}',
...                        b'{"oops"'], partition=0, offsets=[10, 11], now_ms=10**13)
>>> ev.select(["event_id", "ts", "label", "kafka_offset", "hour"]).to_pylist()
[{'event_id': 'a', 'ts': 5, 'label': 1, 'kafka_offset': 10, 'hour': 3}]
>>> bad["kafka_offset"].to_pylist(), bad["reason"][0].as_py()[:14], bad["value"][0].as_py()
([11], 'malformed JSON', b'{"oops"')
"""

from __future__ import annotations

import re
from typing import Sequence

import pyarrow as pa

from reloop.events import Event, parse_event

CORE_SCHEMA = pa.schema([("event_id", pa.string()), ("ts", pa.int64()), ("user_id", pa.string()),
                         ("item_id", pa.string()), ("label", pa.int8()), ("kafka_partition", pa.int32()),
                         ("kafka_offset", pa.int64())])
#: one row per rejected record: where it was, the reason, and the original key and value bytes
REJECT_SCHEMA = pa.schema([("kafka_partition", pa.int32()), ("kafka_offset", pa.int64()),
                           ("reason", pa.string()), ("key", pa.binary()), ("value", pa.binary())])
#: one row per record read from Kafka (the unit the reader emits)
RAW_SCHEMA = pa.schema([("kafka_partition", pa.int32()), ("kafka_offset", pa.int64()),
                        ("key", pa.binary()), ("value", pa.binary())])


def reason_kind(reason: str) -> str:
    """A short metric-friendly category of a rejection reason.

    >>> reason_kind("malformed JSON: Expecting value"), reason_kind("missing field(s): ts")
    ('malformed_json', 'missing_field')
    """
    head = re.sub(r"\(.*?\)", "", reason.split(":", 1)[0]).strip().lower()
    return re.sub(r"[^a-z0-9]+", "_", head).strip("_")[:40] or "other"


def parse_batch(values: Sequence[bytes | None], *, partition: int, offsets: Sequence[int],
                keys: Sequence[bytes | None] | None = None, now_ms: int | None = None) -> tuple[pa.Table, pa.Table]:
    """``(events, rejections)`` of one batch of records from one partition (see the module docstring)."""
    keys = keys if keys is not None else [None] * len(values)
    cols: dict[str, list] = {n: [] for n in ("event_id", "ts", "user_id", "item_id", "label", "kafka_offset")}
    contexts: list[dict] = []
    has_context = False
    bad: dict[str, list] = {"kafka_offset": [], "reason": [], "key": [], "value": []}
    for off, key, raw in zip(offsets, keys, values):
        ev = parse_event(raw, now_ms=now_ms) if raw is not None else None
        if isinstance(ev, Event):
            cols["event_id"].append(ev.event_id)
            cols["ts"].append(ev.ts)
            cols["user_id"].append(ev.user_id)
            cols["item_id"].append(ev.item_id)
            cols["label"].append(ev.label)
            cols["kafka_offset"].append(off)
            contexts.append(ev.context)
            has_context = has_context or bool(ev.context)
        else:
            bad["kafka_offset"].append(off)
            bad["reason"].append(ev.reason if ev is not None else "empty record (null value)")
            bad["key"].append(key)
            bad["value"].append(raw if raw is not None else b"")
    n = len(cols["ts"])
    arrays = [pa.array(cols["event_id"], pa.string()), pa.array(cols["ts"], pa.int64()),
              pa.array(cols["user_id"], pa.string()), pa.array(cols["item_id"], pa.string()),
              pa.array(cols["label"], pa.int8()), pa.array([partition] * n, pa.int32()),
              pa.array(cols["kafka_offset"], pa.int64())]
    events = pa.Table.from_arrays(arrays, schema=CORE_SCHEMA)
    if has_context:
        for name, arr in _context_columns(contexts).items():
            events = events.append_column(name, arr)
    rejects = pa.table({"kafka_partition": pa.array([partition] * len(bad["reason"]), pa.int32()),
                        "kafka_offset": pa.array(bad["kafka_offset"], pa.int64()),
                        "reason": pa.array(bad["reason"], pa.string()),
                        "key": pa.array(bad["key"], pa.binary()),
                        "value": pa.array(bad["value"], pa.binary())}, schema=REJECT_SCHEMA)
    return events, rejects


def _context_columns(contexts: list[dict]) -> dict[str, pa.Array]:
    names = sorted({k for c in contexts for k in c})
    out: dict[str, pa.Array] = {}
    for name in names:
        values = [c.get(name) for c in contexts]
        col = f"context_{name}" if name in CORE_SCHEMA.names else name
        out[col] = _typed(values)
    return out


def _typed(values: list) -> pa.Array:
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {bool}:
        return pa.array(values, pa.bool_())
    if kinds <= {int}:
        return pa.array(values, pa.int64())
    if kinds <= {int, float}:
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def concat_events(tables: Sequence[pa.Table]) -> pa.Table:
    """Concatenate event tables whose context columns may differ (missing -> null, type clash -> string)."""
    tables = [t for t in tables if t is not None]
    if not tables:
        return CORE_SCHEMA.empty_table()
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        names = [n for n in dict.fromkeys(n for t in tables for n in t.column_names) if n not in CORE_SCHEMA.names]
        fixed = []
        for t in tables:
            for n in names:
                if n in t.column_names and not pa.types.is_string(t.schema.field(n).type):
                    t = t.set_column(t.column_names.index(n), n, t[n].cast(pa.string()))
            fixed.append(t)
        return pa.concat_tables(fixed, promote_options="permissive")
