"""Parse a batch of raw Kafka records into an Arrow event table plus a table of rejections.

Pure: no Beam, no Kafka. Each record goes through the one parser of the event
contract (:func:`pipelines.events.parse_event`); what it accepts becomes a row of
a column-oriented table, what it rejects keeps its original bytes and the
reason, for the dead-letter topic.

Accepted rows carry where they came from (``kafka_partition``,
``kafka_offset``) so the job can order ties deterministically and the training
examples can be traced back to the log. Context fields become columns (a
context key that would collide with a core, Kafka or feature column is rejected
by the contract, with a reason); a column whose values mix types is stored as
strings.

>>> ev, bad = parse_batch([b'{"event_id":"a","ts":5,"user_id":"u","item_id":"i","label":1,"context":{"hour":3}}',
...                        b'{"oops"'], partition=0, offsets=[10, 11], now_ms=10**13)
>>> ev.select(["event_id", "ts", "label", "kafka_offset", "hour"]).to_pylist()
[{'event_id': 'a', 'ts': 5, 'label': 1, 'kafka_offset': 10, 'hour': 3}]
>>> bad["kafka_offset"].to_pylist(), bad["reason"][0].as_py()[:14], bad["value"][0].as_py()
([11], 'malformed JSON', b'{"oops"')
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from pipelines.events import (
    MAX_CONTEXT_FIELDS,
    MAX_CONTEXT_STRING,
    MAX_FUTURE_MS,
    MAX_ID_CHARS,
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    MAX_TS_MS,
    Event,
    Rejection,
    parse_event,
    reserved_name,
)

CORE_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("ts", pa.int64()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("label", pa.int8()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
    ]
)
#: one row per rejected record: where it was, the reason, and the original key and value bytes
REJECT_SCHEMA = pa.schema(
    [
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        ("reason", pa.string()),
        ("key", pa.binary()),
        ("value", pa.binary()),
    ]
)
#: one row per record read from Kafka (the unit the reader emits)
RAW_SCHEMA = pa.schema(
    [("kafka_partition", pa.int32()), ("kafka_offset", pa.int64()), ("key", pa.binary()), ("value", pa.binary())]
)


def reason_kind(reason: str) -> str:
    """A short metric-friendly category of a rejection reason.

    >>> reason_kind("malformed JSON: Expecting value"), reason_kind("missing field(s): ts")
    ('malformed_json', 'missing_field')
    """
    head = re.sub(r"\(.*?\)", "", reason.split(":", 1)[0]).strip().lower()
    return re.sub(r"[^a-z0-9]+", "_", head).strip("_")[:40] or "other"


class Rejects:
    """The rejections of one batch of one partition, gathered record by record into a ``REJECT_SCHEMA`` table.

    >>> r = Rejects(partition=3)
    >>> r.add(7, b"k", b"{}", Rejection("missing field(s): ts", b"{}")); r.add(8, None, None, None)
    >>> r.table().select(["kafka_partition", "kafka_offset", "reason"]).to_pylist()[1]
    {'kafka_partition': 3, 'kafka_offset': 8, 'reason': 'empty record (null value)'}
    """

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.cols: dict[str, list] = {"kafka_offset": [], "reason": [], "key": [], "value": []}

    def add(self, offset: int, key: bytes | None, raw: bytes | None, rejection: Rejection | None) -> None:
        """One refused record (``rejection`` None: its value was null)."""
        self.cols["kafka_offset"].append(int(offset))
        self.cols["reason"].append(rejection.reason if rejection is not None else "empty record (null value)")
        self.cols["key"].append(key)
        self.cols["value"].append(raw if raw is not None else b"")

    def table(self) -> pa.Table:
        c = self.cols
        return pa.table(
            {
                "kafka_partition": pa.array([self.partition] * len(c["reason"]), pa.int32()),
                "kafka_offset": pa.array(c["kafka_offset"], pa.int64()),
                "reason": pa.array(c["reason"], pa.string()),
                "key": pa.array(c["key"], pa.binary()),
                "value": pa.array(c["value"], pa.binary()),
            },
            schema=REJECT_SCHEMA,
        )


def parse_batch(
    values: Sequence[bytes | None] | pa.Array,
    *,
    partition: int,
    offsets: Sequence[int] | np.ndarray,
    keys: Sequence[bytes | None] | pa.Array | None = None,
    now_ms: int | None = None,
) -> tuple[pa.Table, pa.Table]:
    """``(events, rejections)`` of one batch of records from one partition (see the module docstring).

    ``values`` and ``keys`` are lists of bytes or Arrow binary arrays (what the Kafka reader emits; no
    Python object per record is made for them). Records of the plain shape (the five required fields
    and a flat context) are decoded in one vectorised pass (:func:`_fast_parse`); every other record goes
    through :func:`pipelines.events.parse_event`, so acceptance and reasons are exactly the contract's
    (``tests/test_pipeline_parse.py`` checks that).

    Before pyarrow's JSON reader sees a record it must pass a vectorised screen (:func:`_screen`): not
    null, within the size cap, one line, at most ``MAX_JSON_DEPTH`` brackets (so at most that deep:
    deeper input crashes the reader) and valid UTF-8. Records that fail the screen take the per-record
    path, whose own checks (:func:`reloop.events.decode_json`) give them the contract's reason. The
    screen costs a few passes of NumPy over the bytes.
    """
    values = values if isinstance(values, pa.Array) else pa.array(list(values), pa.binary())
    values = values.cast(pa.binary())
    n = len(values)
    keys = keys if isinstance(keys, pa.Array) else pa.array(list(keys) if keys is not None else [None] * n, pa.binary())
    offsets = np.asarray(offsets, np.int64)
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    screened = _screen(values)
    fast = None
    if screened.any():
        sub = values if screened.all() else values.filter(pa.array(screened))
        try:
            fast = _fast_parse(sub, now_ms)
        except Exception:  # noqa: BLE001  (the vectorised path is an optimisation: any failure -> per record)
            fast = None
    if fast is None:
        return _slow_parse(
            values.to_pylist(), partition=partition, offsets=offsets.tolist(), keys=keys.to_pylist(), now_ms=now_ms
        )
    accepted, sub_ok = fast
    ok = np.zeros(n, bool)
    ok[np.flatnonzero(screened)[sub_ok]] = True
    core = accepted.select(_FAST_SCHEMA.names)
    events = core.append_column("kafka_partition", pa.array(np.full(len(core), partition, np.int32))).append_column(
        "kafka_offset", pa.array(offsets[ok])
    )
    for name in accepted.column_names[len(_FAST_SCHEMA.names) :]:
        events = events.append_column(name, accepted[name])
    rest = np.flatnonzero(~ok)
    if len(rest) == 0:
        return events, REJECT_SCHEMA.empty_table()
    idx = pa.array(rest)
    slow_events, rejects = _slow_parse(
        values.take(idx).to_pylist(),
        partition=partition,
        offsets=offsets[rest].tolist(),
        keys=keys.take(idx).to_pylist(),
        now_ms=now_ms,
    )
    return concat_events([events, slow_events]).sort_by("kafka_offset"), rejects


def _count_at(positions: np.ndarray, offsets: np.ndarray, n: int) -> np.ndarray:
    """Per record, how many of the byte ``positions`` fall inside it (``offsets`` delimit the records)."""
    return np.bincount(np.searchsorted(offsets, positions, side="right") - 1, minlength=n)[:n]


def _screen(values: pa.Array) -> np.ndarray:
    """Which records the vectorised JSON reader may see (see :func:`parse_batch`)."""
    n = len(values)
    if n == 0:
        return np.zeros(0, bool)
    ok = ~values.is_null().to_numpy(zero_copy_only=False)
    offsets = np.frombuffer(values.buffers()[1], np.int32)[values.offset : values.offset + n + 1].astype(np.int64)
    data = values.buffers()[2]
    base = int(offsets[0])
    data = np.frombuffer(data, np.uint8)[base : int(offsets[-1])] if data is not None else np.zeros(0, np.uint8)
    rel = offsets - base
    lengths = np.diff(rel)
    ok &= (lengths > 0) & (lengths <= MAX_PAYLOAD_BYTES)
    if len(data):
        # per-record counts from the positions of the (few) bytes of interest: no pass of int64 over the data
        newline = np.flatnonzero(data == 0x0A)
        if len(newline):
            ok &= _count_at(newline, rel, n) == 0
        openers = np.flatnonzero((data == 0x7B) | (data == 0x5B))
        if len(openers) > MAX_JSON_DEPTH:
            ok &= _count_at(openers, rel, n) <= MAX_JSON_DEPTH
        if (data >= 0x80).any():  # only then can a record be invalid UTF-8
            try:
                values.cast(pa.string())  # Arrow validates UTF-8 on this cast
            except pa.ArrowInvalid:
                ok &= np.array([v is None or _is_utf8(v) for v in values.to_pylist()], bool)
    return ok


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _json_lines(values: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """The records joined by newlines into one buffer, and each record's length; None if a record is
    null or contains a newline itself (then the batch is not plain JSON lines)."""
    values = values.cast(pa.binary())
    n = len(values)
    if n == 0 or values.null_count:
        return None
    offsets = np.frombuffer(values.buffers()[1], np.int32)[values.offset : values.offset + n + 1]
    data = np.frombuffer(values.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    if (data == 0x0A).any():
        return None
    joined = np.full(len(data) + n - 1, 0x0A, np.uint8)
    keep = np.ones(len(joined), bool)
    keep[offsets[1:-1] - offsets[0] + np.arange(n - 1)] = False  # the separators
    joined[keep] = data
    return joined, np.diff(offsets)


_FAST_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("ts", pa.int64()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("label", pa.int64()),
    ]
)
# core fields typed, everything else inferred: a flat ``context`` object becomes a struct column
_FAST_OPTIONS = pajson.ParseOptions(explicit_schema=_FAST_SCHEMA, unexpected_field_behavior="infer")
_CONTEXT_TYPES = (pa.int64(), pa.float64(), pa.string(), pa.bool_(), pa.null())


def _fast_parse(values: pa.Array, now_ms: int) -> tuple[pa.Table, np.ndarray] | None:
    """Vectorised decode of a batch whose records are all plain events: ``(accepted rows, accepted mask)``.

    Returns None when the batch as a whole does not fit (a null or multi-line record, a field of
    another type, an unknown top-level field, a context value that is not a string, number, boolean or
    null): the caller parses record by record. Rows that decode but fail a check (missing field, empty
    or long id, ts or label out of range, oversized, long or non-finite context value) are left out of
    the mask and re-parsed one by one, which gives them the contract's exact reason.
    """
    lines = _json_lines(values)
    if lines is None:
        return None
    joined, lengths = lines
    try:
        t = pajson.read_json(
            pa.py_buffer(joined),
            parse_options=_FAST_OPTIONS,
            read_options=pajson.ReadOptions(block_size=max(1 << 20, len(joined) + 1)),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if t.num_rows != len(values) or set(t.column_names) - {*_FAST_SCHEMA.names, "context"}:
        return None
    t = t.combine_chunks()
    valid = lambda arr: pc.fill_null(arr, False).to_numpy(zero_copy_only=False)  # noqa: E731
    ok = lengths <= MAX_PAYLOAD_BYTES
    for name in ("event_id", "user_id", "item_id"):
        length = pc.utf8_length(t[name])
        ok &= valid(pc.and_(pc.greater(length, 0), pc.less_equal(length, MAX_ID_CHARS)))
    ceiling = min(MAX_TS_MS, now_ms + MAX_FUTURE_MS)
    ok &= valid(pc.and_(pc.greater(t["ts"], 0), pc.less_equal(t["ts"], ceiling)))
    ok &= valid(pc.is_in(t["label"], value_set=pa.array([0, 1], pa.int64())))
    context: dict[str, pa.Array] = {}
    if "context" in t.column_names:
        ctx = t["context"].combine_chunks() if isinstance(t["context"], pa.ChunkedArray) else t["context"]
        if pa.types.is_struct(ctx.type):
            if ctx.type.num_fields > MAX_CONTEXT_FIELDS:
                return None
            for i in range(ctx.type.num_fields):
                f = ctx.type.field(i)
                if f.type not in _CONTEXT_TYPES or reserved_name(f.name):
                    return None  # a reserved key is rejected per record, with the contract's reason
                child = pc.struct_field(ctx, [i])
                if f.type == pa.string():
                    ok &= pc.fill_null(pc.less_equal(pc.utf8_length(child), MAX_CONTEXT_STRING), True).to_numpy(
                        zero_copy_only=False
                    )
                elif f.type == pa.float64():
                    ok &= pc.fill_null(pc.is_finite(child), True).to_numpy(zero_copy_only=False)
                    # pyarrow reads an integer literal beyond int64 as a double; Python keeps it an int,
                    # which the contract rejects: such rows take the per-record path
                    ok &= ~pc.fill_null(
                        pc.and_(pc.equal(pc.floor(child), child), pc.greater_equal(pc.abs(child), 2.0**63)), False
                    ).to_numpy(zero_copy_only=False)
                context[f.name] = child.cast(pa.bool_()) if f.type == pa.null() else child
        elif not pa.types.is_null(ctx.type):
            return None
    keep = pa.array(ok)
    accepted = t.select(_FAST_SCHEMA.names).filter(keep)
    accepted = accepted.set_column(4, "label", pc.cast(accepted["label"], pa.int8()))
    for name in sorted(context):
        accepted = accepted.append_column(name, context[name].filter(keep))
    return accepted, ok


def _slow_parse(
    values: Sequence[bytes | None],
    *,
    partition: int,
    offsets: Sequence[int],
    keys: Sequence[bytes | None],
    now_ms: int | None,
) -> tuple[pa.Table, pa.Table]:
    """Record by record through :func:`pipelines.events.parse_event`."""
    cols: dict[str, list] = {n: [] for n in ("event_id", "ts", "user_id", "item_id", "label", "kafka_offset")}
    contexts: list[dict] = []
    has_context = False
    bad = Rejects(partition)
    for off, key, raw in zip(offsets, keys, values):
        ev = parse_event(raw, now_ms=now_ms) if raw is not None else None
        if isinstance(ev, Event) and not _valid_unicode(ev):
            ev = Rejection("invalid unicode: a lone surrogate escape in an id or context string", raw)
        if isinstance(ev, Event) and ev.context and not _storable(ev.context):
            ev = Rejection("context: a value Arrow cannot store", raw)
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
            bad.add(off, key, raw, ev)
    n = len(cols["ts"])
    arrays = [
        pa.array(cols["event_id"], pa.string()),
        pa.array(cols["ts"], pa.int64()),
        pa.array(cols["user_id"], pa.string()),
        pa.array(cols["item_id"], pa.string()),
        pa.array(cols["label"], pa.int8()),
        pa.array([partition] * n, pa.int32()),
        pa.array(cols["kafka_offset"], pa.int64()),
    ]
    events = pa.Table.from_arrays(arrays, schema=CORE_SCHEMA)
    if has_context:
        for name, arr in _context_columns(contexts).items():
            events = events.append_column(name, arr)
    return events, bad.table()


def _valid_unicode(ev: Event) -> bool:
    """JSON may escape lone surrogates (``"\\ud800"``), which Python accepts and Arrow strings cannot hold."""
    try:
        (ev.event_id + ev.user_id + ev.item_id).encode()
        if ev.context:
            json.dumps(ev.context, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _storable(context: dict) -> bool:
    """Defence in depth behind the contract's checks: every value converts to its Arrow column."""
    try:
        for v in context.values():
            _typed([v])
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, ValueError):
        return False
    return True


def _context_columns(contexts: list[dict]) -> dict[str, pa.Array]:
    # context keys never take a reserved name (reloop.events.reserved_name): no renaming is needed
    names = sorted({k for c in contexts for k in c})
    return {name: _typed([c.get(name) for c in contexts]) for name in names}


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
