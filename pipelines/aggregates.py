"""Leak-free, event-time windowed aggregates per user and per item, as NumPy batches.

This is the one place the feature math lives: the Beam feature job, the
chronological evaluation and the scoring service all call it, so training and
serving see the same numbers.

For every event at time ``t`` the features of its user and its item are the
aggregates over that entity's accepted events with timestamp **strictly
before** ``t`` (events at the same millisecond do not see each other), so a
label never leaks into its own features:

- ``{e}_imp_{w}`` / ``{e}_pos_{w}``: impressions and positives in ``[t - w, t)``
  for each window ``w`` (1 h, 1 day, 7 days by default) and over all time (``all``);
- ``{e}_ctr_{w}``: smoothed click rate ``(pos + m * prior) / (imp + m)``;
- ``{e}_secs_since_last``: seconds since the entity's previous event (-1 if none);
- ``user_last_items``: the user's last N items, most recent first.

State between micro-batches (:class:`FeatureState`) is the tail of accepted
events within ``horizon_ms`` of the watermark (the newest accepted event time)
plus per-entity counters of the events already evicted from the tail, so the
results are exact whatever the batch boundaries, constant in memory per
entity, and persist as Arrow tables (Parquet; never pickle).

Late events: an event older than ``watermark - allowed_lateness_ms`` is
dropped and counted (``stats['late']``, and handed back for the dead-letter
topic); a later one is accepted, gets exact as-of features, and counts towards
every aggregate from then on (features already emitted for newer events are
not revised). An ``event_id`` already in the tail (or earlier in the log) is a
duplicate: dropped the same way (``stats['duplicates']``); the first copy wins.
Events far ahead of their partition's recent times are screened off before
(:func:`screen_ahead`), so a forged timestamp cannot make the stream late.

>>> import pyarrow as pa
>>> ev = pa.table({"event_id": ["a", "b", "c"], "ts": [0, 1_000, 1_000], "user_id": ["u", "u", "u"],
...                "item_id": ["i", "j", "i"], "label": pa.array([1, 0, 1], pa.int8())})
>>> cfg = AggregateConfig()
>>> feats, state, stats = compute_features(ev, FeatureState.empty(), cfg)
>>> feats["user_imp_all"].to_pylist(), feats["user_pos_all"].to_pylist()
([0, 1, 1], [0, 1, 1])
>>> feats["item_imp_all"].to_pylist(), feats["user_last_items"].to_pylist()
([0, 0, 1], [[], ['i'], ['i']])
>>> feats["user_secs_since_last"].to_pylist()
[-1.0, 1.0, 1.0]
>>> users, items = snapshot(state, 2_000, cfg)
>>> users["user_imp_all"].to_pylist(), users["user_last_items"].to_pylist()
([3], [['i', 'j', 'i']])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.windows import DAY_MS, HOUR_MS, WINDOWS_MS, window_names  # noqa: F401  (HOUR_MS, DAY_MS re-exported)


@dataclass(frozen=True)
class AggregateConfig:
    """What to aggregate. The defaults are the feature views in ``features/``."""

    windows_ms: tuple[tuple[str, int], ...] = WINDOWS_MS
    #: smoothed CTR = (pos + prior_weight * prior_ctr) / (imp + prior_weight)
    prior_ctr: float = 0.5
    prior_weight: float = 10.0
    last_n: int = 5
    #: events older than watermark - allowed_lateness_ms are dropped (and counted)
    allowed_lateness_ms: int = HOUR_MS
    #: an event further than this ahead of its partition's recent event times is dead-lettered
    #: (:func:`screen_ahead`), so one forged timestamp cannot drag the watermark. 7 days: 1.8x the
    #: largest gap between consecutive events of one partition in MovieLens-100K (94.9 h, 4 partitions).
    max_ahead_ms: int = 7 * DAY_MS
    #: a partition's batch of at least this many events also vouches for its own median event time
    min_support: int = 16

    def __post_init__(self) -> None:
        if not self.windows_ms or any(w <= 0 for _, w in self.windows_ms):
            raise ValueError(f"windows_ms must be non-empty positive durations, got {self.windows_ms}")
        if not 0.0 <= self.prior_ctr <= 1.0 or self.prior_weight <= 0:
            raise ValueError(
                f"need 0 <= prior_ctr <= 1 and prior_weight > 0, got {self.prior_ctr}, {self.prior_weight}"
            )
        if self.last_n < 0 or self.allowed_lateness_ms < 0:
            raise ValueError("last_n and allowed_lateness_ms must be >= 0")
        if self.max_ahead_ms <= 0 or self.min_support < 1:
            raise ValueError(f"need max_ahead_ms > 0 and min_support >= 1, got {self.max_ahead_ms}, {self.min_support}")

    @property
    def horizon_ms(self) -> int:
        """How far back the tail reaches: every window and the allowed lateness fit inside it."""
        return max(max(w for _, w in self.windows_ms), self.allowed_lateness_ms)

    def feature_names(self, entity: str) -> list[str]:
        names = []
        for w in window_names(self.windows_ms):
            names += [f"{entity}_imp_{w}", f"{entity}_pos_{w}", f"{entity}_ctr_{w}"]
        return names + [f"{entity}_secs_since_last"]


DEFAULT_CONFIG = AggregateConfig()
USER_FEATURES: list[str] = DEFAULT_CONFIG.feature_names("user")
ITEM_FEATURES: list[str] = DEFAULT_CONFIG.feature_names("item")

_TAIL_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("ts", pa.int64()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("label", pa.int8()),
    ]
)
_EVICTED_SCHEMA = pa.schema(
    [
        ("entity", pa.string()),
        ("id", pa.string()),
        ("imp", pa.int64()),
        ("pos", pa.int64()),
        ("last_ts", pa.int64()),
        ("last_items", pa.list_(pa.string())),
    ]
)


@dataclass
class FeatureState:
    """Everything needed to continue the aggregates after a micro-batch.

    ``tail``: accepted events with ``ts >= watermark - horizon`` (event_id, ts, user_id, item_id, label).
    ``evicted``: per entity (``user``/``item``, id), counters of the events dropped from the tail:
    impressions, positives, the newest evicted ts and (users) the newest evicted items.
    """

    tail: pa.Table
    evicted: pa.Table
    watermark: int = -1
    counts: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "late": 0, "duplicates": 0})
    #: newest accepted event time per Kafka partition (the reference of :func:`screen_ahead`)
    marks: dict[int, int] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> FeatureState:
        return cls(_TAIL_SCHEMA.empty_table(), _EVICTED_SCHEMA.empty_table())

    def to_arrow(self) -> dict[str, pa.Table]:
        """Two tables (``tail``, ``evicted``) whose schema metadata carries the watermark and counters."""
        meta = {
            b"watermark": str(self.watermark).encode(),
            b"marks": json.dumps({str(p): int(t) for p, t in sorted(self.marks.items())}).encode(),
            **{f"count_{k}".encode(): str(v).encode() for k, v in self.counts.items()},
        }
        return {"tail": self.tail.replace_schema_metadata(meta), "evicted": self.evicted}

    @classmethod
    def from_arrow(cls, tables: dict[str, pa.Table]) -> FeatureState:
        tail, evicted = tables["tail"], tables["evicted"]
        meta = tail.schema.metadata or {}
        counts = {k.decode()[6:]: int(v) for k, v in meta.items() if k.startswith(b"count_")}
        state = cls(tail.cast(_TAIL_SCHEMA), evicted.cast(_EVICTED_SCHEMA), int(meta.get(b"watermark", b"-1")))
        state.counts.update(counts)
        state.marks = {int(p): int(t) for p, t in json.loads(meta.get(b"marks", b"{}")).items()}
        return state


# ---------------------------------------------------------------------------------------------
# the vectorised core


@dataclass
class _Entity:
    """The tail of one entity kind, sorted by (code, ts), with cumulative sums for O(1) window counts.

    Codes index one dictionary shared by the tail and the queries (:func:`_encode`); the evicted
    counters are per code, and the evicted last items are ``ev_items[ev_start[c]:ev_start[c] + ev_len[c]]``.
    """

    ts: np.ndarray  # (N,) int64
    cum_pos: np.ndarray  # (N+1,) cumulative positives
    items: pa.Array  # (N,) item ids of the sorted tail (for last-N)
    keys: np.ndarray  # (N,) composite sort key
    ev_imp: np.ndarray  # (C,) evicted counters per code
    ev_pos: np.ndarray
    ev_last_ts: np.ndarray
    ev_start: np.ndarray  # (C,) where the code's evicted last items start in ev_items
    ev_len: np.ndarray  # (C,) how many there are
    ev_items: pa.Array


def _composite(codes: np.ndarray, ts: np.ndarray, t0: int) -> np.ndarray:
    # one sortable int64: entity code in the high bits, event time (ms since t0, < 2^40 ~ 34 years) below
    return (codes.astype(np.int64) << 40) | (ts - t0).astype(np.int64)


def _encode(*arrays: pa.Array) -> tuple[list[np.ndarray], pa.Array]:
    """Codes of string arrays in one shared dictionary (Arrow's C++ hashing: no sort of Python strings).

    >>> codes, dictionary = _encode(pa.array(["b", "a"]), pa.array(["a", "c"]))
    >>> [c.tolist() for c in codes], dictionary.to_pylist()
    ([[0, 1], [1, 2]], ['b', 'a', 'c'])
    """
    sizes = [len(a) for a in arrays]
    enc = pa.concat_arrays([a.cast(pa.string()) for a in arrays]).dictionary_encode()
    codes = enc.indices.to_numpy().astype(np.int64)
    return np.split(codes, np.cumsum(sizes)[:-1]), enc.dictionary


def _index(
    codes: np.ndarray,
    tail_ts: np.ndarray,
    tail_labels: np.ndarray,
    tail_items: pa.Array,
    dictionary: pa.Array,
    ev: pa.Table,
    t0: int,
) -> _Entity:
    order = np.lexsort((tail_ts, codes))
    codes, ts = codes[order], tail_ts[order]
    cum_pos = np.concatenate([[0], np.cumsum(tail_labels[order], dtype=np.int64)])
    c = len(dictionary)
    ev_imp, ev_pos = np.zeros(c, np.int64), np.zeros(c, np.int64)
    ev_last_ts = np.full(c, -1, np.int64)
    ev_start, ev_len = np.zeros(c, np.int64), np.zeros(c, np.int64)
    ev_items = pa.array([], pa.string())
    if ev.num_rows:
        where = pc.index_in(ev["id"], value_set=dictionary)
        hit = where.is_valid().to_numpy(zero_copy_only=False)  # evicted ids among this batch's codes
        p = where.drop_null().to_numpy().astype(np.int64)
        ev_imp[p] = ev["imp"].to_numpy()[hit]
        ev_pos[p] = ev["pos"].to_numpy()[hit]
        ev_last_ts[p] = ev["last_ts"].to_numpy()[hit]
        lists = ev["last_items"].combine_chunks()
        offsets = lists.offsets.to_numpy()
        ev_start[p], ev_len[p] = offsets[:-1][hit], np.diff(offsets)[hit]
        ev_items = lists.values
    return _Entity(
        ts,
        cum_pos,
        tail_items.take(pa.array(order)),
        _composite(codes, ts, t0),
        ev_imp,
        ev_pos,
        ev_last_ts,
        ev_start,
        ev_len,
        ev_items,
    )


def _query(
    ent: _Entity, qcodes: np.ndarray, qts: np.ndarray, t0: int, cfg: AggregateConfig, prefix: str, with_last_items: bool
) -> dict[str, np.ndarray | pa.Array]:
    """Features of entities ``qcodes`` as of strictly before ``qts``, from the indexed tail."""
    out: dict[str, np.ndarray | pa.Array] = {}
    hi = np.searchsorted(ent.keys, _composite(qcodes, qts, t0), side="left")  # rows with ts < t
    lo_all = np.searchsorted(ent.keys, _composite(qcodes, np.full_like(qts, t0), t0), side="left")
    smooth = cfg.prior_weight * cfg.prior_ctr
    for name, w in cfg.windows_ms:
        lo = np.searchsorted(ent.keys, _composite(qcodes, np.maximum(qts - w, t0), t0), side="left")
        imp = hi - lo
        pos = ent.cum_pos[hi] - ent.cum_pos[lo]
        out[f"{prefix}_imp_{name}"] = imp
        out[f"{prefix}_pos_{name}"] = pos
        out[f"{prefix}_ctr_{name}"] = (pos + smooth) / (imp + cfg.prior_weight)
    imp = hi - lo_all + ent.ev_imp[qcodes]
    pos = ent.cum_pos[hi] - ent.cum_pos[lo_all] + ent.ev_pos[qcodes]
    out[f"{prefix}_imp_all"], out[f"{prefix}_pos_all"] = imp, pos
    out[f"{prefix}_ctr_all"] = (pos + smooth) / (imp + cfg.prior_weight)
    has_prev = hi > lo_all
    prev_ts = np.where(has_prev, ent.ts[np.maximum(hi - 1, 0)] if len(ent.ts) else -1, ent.ev_last_ts[qcodes])
    out[f"{prefix}_secs_since_last"] = np.where(prev_ts >= 0, (qts - prev_ts) / 1000.0, -1.0)
    if with_last_items:
        out["user_last_items"] = _last_items(ent, qcodes, lo_all, hi, cfg.last_n)
    return out


def _last_items(ent: _Entity, qcodes: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: int) -> pa.ListArray:
    """Per query, the newest ``n`` items before it: tail rows ``hi-1, hi-2, ... >= lo``, then the evicted
    items of its entity (already newest first). Built as one gather, no Python loop per query."""
    from_tail = np.minimum(hi - lo, n)
    from_ev = np.minimum(n - from_tail, ent.ev_len[qcodes])
    lengths = from_tail + from_ev
    offsets = np.zeros(len(qcodes) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    row = np.repeat(np.arange(len(qcodes)), lengths)
    j = np.arange(offsets[-1]) - offsets[row]
    tail_part = j < from_tail[row]
    take = np.where(tail_part, hi[row] - 1 - j, len(ent.items) + ent.ev_start[qcodes[row]] + (j - from_tail[row]))
    pool = pa.concat_arrays([ent.items.cast(pa.string()), ent.ev_items.cast(pa.string())])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pool.take(pa.array(take)))


def _dedupe(events: pa.Table, state: FeatureState, cfg: AggregateConfig) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Drop events too late for the allowed lateness, and event_ids already seen (in the tail or the batch).

    Returns ``(kept, late mask, duplicate mask)`` (masks over ``events``). Of several copies of one
    ``event_id`` the first in the log wins: the one already in the tail, else the lowest (partition,
    offset) when the rows carry their Kafka origin, else the first row; never the one with the smallest
    timestamp (a forged copy could choose that).
    """
    n = events.num_rows
    keep = np.ones(n, bool)
    ts = events["ts"].to_numpy()
    late = np.zeros(n, bool)
    if state.watermark >= 0:
        late = ts < state.watermark - cfg.allowed_lateness_ms
        keep &= ~late
    (codes,), _ = _encode(events["event_id"].combine_chunks())
    seen = (
        pc.is_in(events["event_id"], value_set=state.tail["event_id"].combine_chunks()).to_numpy(zero_copy_only=False)
        if state.tail.num_rows
        else np.zeros(n, bool)
    )
    if "kafka_offset" in events.column_names and "kafka_partition" in events.column_names:
        order = np.lexsort((events["kafka_offset"].to_numpy(), events["kafka_partition"].to_numpy()))
    else:
        order = np.arange(n)
    _, first_pos = np.unique(codes[order], return_index=True)
    first = np.zeros(n, bool)
    first[order[first_pos]] = True
    dup = (seen | ~first) & keep
    keep &= ~dup
    return events.filter(pa.array(keep)), late, dup


def screen_ahead(
    events: pa.Table, state: FeatureState, cfg: AggregateConfig = DEFAULT_CONFIG
) -> tuple[pa.Table, pa.Table]:
    """``(kept, ahead)``: split off events too far ahead of their partition's recent event times.

    Per partition, in offset order, an event is *ahead* when its ts exceeds the reference by more than
    ``cfg.max_ahead_ms``; the reference is the largest of: the partition's mark in the state (newest
    accepted ts) and the state's watermark, the median ts of the partition's events in this batch when
    there are at least ``cfg.min_support`` of them, else of the whole batch's (a real jump after a quiet
    period moves the whole batch, not one record), and the newest *kept* ts before the event in the batch. So one forged far-future record never moves
    the watermark, and the events after it are judged without it. Events with no reference at all (a
    partition's first small batch) are kept. Needs the ``kafka_partition``/``kafka_offset`` columns.

    >>> ev = pa.table({"ts": [10, 11, 10**9, 12], "kafka_partition": pa.array([0] * 4, pa.int32()),
    ...                "kafka_offset": [0, 1, 2, 3]})
    >>> kept, ahead = screen_ahead(ev, FeatureState(_TAIL_SCHEMA.empty_table(), _EVICTED_SCHEMA.empty_table(),
    ...                            marks={0: 9}), AggregateConfig(max_ahead_ms=100))
    >>> kept["ts"].to_pylist(), ahead["ts"].to_pylist()
    ([10, 11, 12], [1000000000])
    """
    n = events.num_rows
    if n == 0 or "kafka_partition" not in events.column_names:
        return events, events.slice(0, 0)
    parts = events["kafka_partition"].to_numpy()
    offsets = events["kafka_offset"].to_numpy()
    ts = events["ts"].to_numpy().astype(np.int64)
    ahead = np.zeros(n, bool)
    none = np.iinfo(np.int64).min
    # partitions are aligned in event time (the job cuts them so): a small partition batch borrows the
    # whole batch's median, and the global watermark is a floor for every partition
    batch_median = int(np.median(ts)) if n >= cfg.min_support else none
    floor = state.watermark if state.watermark >= 0 else none
    for p in np.unique(parts):
        idx = np.flatnonzero(parts == p)
        idx = idx[np.argsort(offsets[idx], kind="stable")]
        t = ts[idx]
        base = max(
            state.marks.get(int(p), none), floor, int(np.median(t)) if len(t) >= cfg.min_support else batch_median
        )
        ahead[idx] = _ahead_of_running_max(t, base, cfg.max_ahead_ms)
    if not ahead.any():
        return events, events.slice(0, 0)
    return events.filter(pa.array(~ahead)), events.filter(pa.array(ahead))


def _ahead_of_running_max(t: np.ndarray, base: int, bound: int) -> np.ndarray:
    """Flags of ``t[i] > max(base, max of unflagged t[j], j < i) + bound``: the sequential rule, computed
    as a fixed point of vectorised passes (flags only grow, and the sequential answer is the only fixed
    point); a long chain of outliers falls back to the plain loop."""
    none = np.iinfo(np.int64).min
    flagged = np.zeros(len(t), bool)
    for _ in range(32):
        prev = np.empty(len(t), np.int64)
        prev[0] = none
        if len(t) > 1:
            prev[1:] = np.maximum.accumulate(np.where(flagged, none, t))[:-1]
        ref = np.maximum(prev, base)
        new = (ref != none) & (t > ref + bound)
        if (new == flagged).all():
            return flagged
        flagged = new
    mark, out = base, np.zeros(len(t), bool)
    for i, x in enumerate(t.tolist()):
        if mark != none and x > mark + bound:
            out[i] = True
        else:
            mark = max(mark, x)
    return out


def advance_marks(state: FeatureState, accepted: pa.Table) -> dict[int, int]:
    """The partition marks after ``accepted`` events (which carry ``kafka_partition``)."""
    marks = dict(state.marks)
    if accepted.num_rows and "kafka_partition" in accepted.column_names:
        parts, ts = accepted["kafka_partition"].to_numpy(), accepted["ts"].to_numpy()
        for p in np.unique(parts):
            marks[int(p)] = max(marks.get(int(p), -1), int(ts[parts == p].max()))
    return marks


def compute_features(
    events: pa.Table,
    state: FeatureState,
    cfg: AggregateConfig = DEFAULT_CONFIG,
    dropped: list[tuple[str, pa.Table]] | None = None,
) -> tuple[pa.Table, FeatureState, dict[str, int]]:
    """Features for each accepted event of ``events`` as of strictly before its ts; the advanced state.

    Returns ``(features, new_state, stats)``: ``features`` keeps the accepted event rows (in time order,
    all original columns) and adds ``USER_FEATURES``, ``ITEM_FEATURES`` and ``user_last_items``;
    ``stats`` counts ``accepted``, ``late`` and ``duplicates`` of this call. The input is not mutated.
    With a ``dropped`` list, the late and duplicate rows are appended to it as ``("late", rows)`` and
    ``("duplicate", rows)``, for the dead-letter topic.
    """
    if events.num_rows:
        events = events.take(pa.array(np.argsort(events["ts"].to_numpy(), kind="stable")))
    original = events
    events, late_mask, dup_mask = _dedupe(events, state, cfg)
    late, dups = int(late_mask.sum()), int(dup_mask.sum())
    if dropped is not None:
        if late:
            dropped.append(("late", original.filter(pa.array(late_mask))))
        if dups:
            dropped.append(("duplicate", original.filter(pa.array(dup_mask))))
    stats = {"accepted": events.num_rows, "late": late, "duplicates": dups}
    new_rows = events.select(_TAIL_SCHEMA.names).cast(_TAIL_SCHEMA)
    combined = pa.concat_tables([state.tail, new_rows])
    feats = events
    if events.num_rows:
        # the origin of the composite sort key: before every tail row and every window start
        t0 = int(pc.min(combined["ts"]).as_py()) - cfg.horizon_ms - 1
        qts = events["ts"].to_numpy()
        for entity in ("user", "item"):
            qids = events[f"{entity}_id"].combine_chunks()
            feats = _append(feats, _entity_features(combined, state.evicted, entity, qids, qts, t0, cfg))
    watermark = max(state.watermark, int(pc.max(events["ts"]).as_py()) if events.num_rows else -1)
    new_state = _advance(combined, state.evicted, watermark, cfg)
    new_state.counts = {k: state.counts.get(k, 0) + v for k, v in stats.items()}
    new_state.marks = advance_marks(state, events)
    return feats, new_state, stats


def _entity_features(
    tail: pa.Table, evicted: pa.Table, entity: str, qids: pa.Array, qts: np.ndarray, t0: int, cfg: AggregateConfig
) -> dict[str, np.ndarray | pa.Array]:
    """Features of one entity kind (``user``/``item``) for query ids at query times."""
    (codes, qcodes), dictionary = _encode(tail[f"{entity}_id"].combine_chunks(), qids)
    ev = evicted.filter(pc.equal(evicted["entity"], entity)) if evicted.num_rows else evicted
    ent = _index(
        codes,
        tail["ts"].to_numpy(),
        tail["label"].to_numpy().astype(np.int64),
        tail["item_id"].combine_chunks(),
        dictionary,
        ev,
        t0,
    )
    return _query(ent, qcodes, qts, t0, cfg, entity, entity == "user")


def _append(table: pa.Table, cols: dict[str, np.ndarray | pa.Array]) -> pa.Table:
    for name, values in cols.items():
        table = table.append_column(name, values if isinstance(values, pa.Array) else pa.array(values))
    return table


def _advance(combined: pa.Table, evicted: pa.Table, watermark: int, cfg: AggregateConfig) -> FeatureState:
    """Move tail rows older than the horizon into the evicted counters."""
    if watermark < 0 or combined.num_rows == 0:
        return FeatureState(combined, evicted, watermark)
    cutoff = watermark - cfg.horizon_ms
    old_mask = pc.less(combined["ts"], cutoff)
    old = combined.filter(old_mask).sort_by([("ts", "ascending")])
    tail = combined.filter(pc.invert(old_mask))
    if old.num_rows == 0:
        return FeatureState(tail, evicted, watermark)
    fresh = [_evicted_counters(old, entity, cfg.last_n) for entity in ("user", "item")]
    return FeatureState(tail, _merge_evicted(evicted, pa.concat_tables(fresh), cfg), watermark)


def _evicted_counters(old: pa.Table, entity: str, last_n: int) -> pa.Table:
    """Per entity of ``old`` (rows sorted by ts): impressions, positives, newest ts and (users) the
    newest ``last_n`` items, newest first."""
    (codes,), ids = _encode(old[f"{entity}_id"].combine_chunks())
    c = len(ids)
    ts = old["ts"].to_numpy()
    last_ts = np.full(c, np.iinfo(np.int64).min, np.int64)
    np.maximum.at(last_ts, codes, ts)
    imp = np.bincount(codes, minlength=c).astype(np.int64)
    if entity == "user":  # rows grouped by code, newest (latest position) first; keep the first last_n
        order = np.lexsort((-np.arange(len(codes)), codes))
        rank = np.arange(len(order)) - np.searchsorted(codes[order], codes[order])
        lengths = np.minimum(imp, last_n)
        items = old["item_id"].combine_chunks().take(pa.array(order[rank < last_n]))
    else:
        lengths, items = np.zeros(c, np.int64), pa.array([], pa.string())
    offsets = np.zeros(c + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.table(
        {
            "entity": pa.array([entity] * c, pa.string()),
            "id": ids.cast(pa.string()),
            "imp": imp,
            "pos": np.bincount(codes, weights=old["label"].to_numpy(), minlength=c).astype(np.int64),
            "last_ts": last_ts,
            "last_items": pa.ListArray.from_arrays(pa.array(offsets), items.cast(pa.string())),
        },
        schema=_EVICTED_SCHEMA,
    )


def _merge_evicted(evicted: pa.Table, fresh: pa.Table, cfg: AggregateConfig) -> pa.Table:
    """Add freshly evicted counters to the existing ones; only the touched entities are rewritten."""
    if evicted.num_rows == 0:
        return fresh
    key_old = pc.binary_join_element_wise(evicted["entity"], evicted["id"], "\x00")
    key_new = pc.binary_join_element_wise(fresh["entity"], fresh["id"], "\x00")
    touched = pc.is_in(key_old, value_set=key_new.combine_chunks())
    keep, prev = evicted.filter(pc.invert(touched)), evicted.filter(touched)
    prev_by_key = {
        k: i for i, k in enumerate(pc.binary_join_element_wise(prev["entity"], prev["id"], "\x00").to_pylist())
    }
    imp, pos = fresh["imp"].to_numpy().copy(), fresh["pos"].to_numpy().copy()
    last_ts, items = fresh["last_ts"].to_numpy().copy(), fresh["last_items"].to_pylist()
    p_imp, p_pos, p_ts = prev["imp"].to_numpy(), prev["pos"].to_numpy(), prev["last_ts"].to_numpy()
    p_items = prev["last_items"].to_pylist()
    for j, k in enumerate(key_new.to_pylist()):
        i = prev_by_key.get(k)
        if i is not None:
            imp[j] += p_imp[i]
            pos[j] += p_pos[i]
            last_ts[j] = max(last_ts[j], p_ts[i])
            items[j] = (items[j] + p_items[i])[: cfg.last_n]  # fresh evictions are newer
    merged = pa.table(
        {
            "entity": fresh["entity"],
            "id": fresh["id"],
            "imp": imp,
            "pos": pos,
            "last_ts": last_ts,
            "last_items": pa.array(items, pa.list_(pa.string())),
        },
        schema=_EVICTED_SCHEMA,
    )
    return pa.concat_tables([keep, merged])


def snapshot(
    state: FeatureState,
    as_of_ts: int,
    cfg: AggregateConfig = DEFAULT_CONFIG,
    users: list[str] | None = None,
    items: list[str] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Current features of entities, as of strictly before ``as_of_ts`` (what an event then would see).

    By default every entity in the state's tail; pass ``users``/``items`` to choose. Each table has the id
    column (``user_id`` / ``item_id``), ``event_timestamp`` (= as_of_ts, ms) and the feature columns.
    """
    tail = state.tail
    t0 = min(int(pc.min(tail["ts"]).as_py()) if tail.num_rows else as_of_ts, as_of_ts) - cfg.horizon_ms - 1
    out = []
    for entity, chosen in (("user", users), ("item", items)):
        key = f"{entity}_id"
        ids = sorted(set(tail[key].to_pylist())) if chosen is None else list(chosen)
        qts = np.full(len(ids), as_of_ts, np.int64)
        table = pa.table({key: pa.array(ids, pa.string()), "event_timestamp": pa.array(qts, pa.int64())})
        out.append(
            _append(table, _entity_features(tail, state.evicted, entity, table[key].combine_chunks(), qts, t0, cfg))
        )
    return out[0], out[1]
