"""The attribution join of contract v2: impressions + delayed feedback -> labelled training examples.

Pure (Arrow and NumPy, no Beam, no Kafka): :class:`JoinFeatures` in
:mod:`pipelines.transforms`-style Beam code calls :func:`join_batch` once per
micro-batch with the state saved for the committed offsets, as the v1
feature job calls ``compute_features`` (Monolith's online joiner, in batch form).

Semantics (all in event time, ``W`` = the attribution window):

- an impression at ``t`` is **positive** when a ``click`` on it arrives at
  ``c`` with ``t <= c <= t + W``; the example is emitted in the micro-batch that
  reads the click, with ``label_ts = c`` (the first such click);
- it is **negative** when the join's watermark passes ``t + W`` without one;
  emitted then, with ``label_ts = t + W``;
- features are those of the impression's user and item **strictly before
  ``t``**, computed when the impression is read and kept with it while its
  window is open: impression counts, recency and last items from the
  impressions before ``t``; positives from the clicks that had *arrived*
  before ``t`` (by click time), so no label that was unknown at ``t`` leaks in.
  Smoothed CTR = ``(pos + m * prior) / (imp + m)`` as in v1;
- the watermark is the minimum, over **every** partition of both topics, of the
  newest event time read from each (a partition not read yet holds it at -1); a
  window closes when ``t + W < watermark`` (strictly: a record at exactly the
  watermark may still be unread in another partition). A partition that has had
  no valid record read for ``idle_timeout_ms`` of processing time (the plans'
  clock) stops holding it, as Flink's ``withIdleness``; the watermark never
  moves back when it wakes up;
- an impression behind the watermark (``t + W < watermark``: its window would
  already have closed) is dropped and counted (``impressions_behind_watermark``),
  and remembered as closed (a click on it is late, not an orphan). Without this a
  reader that trusts the watermark, such as the delayed serving loop, would
  meet an example older than one it was told was final;
- feedback on an impression id the join has never seen (nor remembers as
  closed, see ``closed_retention_ms``) is an **orphan**: dead-lettered with a
  reason and counted (``orphan_feedback``); feedback stamped before its
  impression is dead-lettered too (``feedback_before_impression``);
- a second click on an impression already labelled positive is a
  **duplicate**: counted once (``duplicate_feedback``), never a second example;
- a click after ``t + W`` is **late**: *dropped and counted*
  (``late_feedback``). The example stays negative, as it was (or will be)
  emitted at window close; a correction example is not emitted, because the
  trainer would then learn the same impression twice. Fake-negative corrections
  that use this information belong to the learner (:mod:`online_models.delayed`);
- other feedback kinds (configured conversions) are counted (``other_feedback``)
  and do not label the click model;
- an impression id seen again is a duplicate impression: dropped, counted.

The state (:class:`JoinState`) is Arrow tables only: two feature states (impressions, clicks), the open
impressions with their features, and the ids of closed impressions for ``closed_retention_ms``.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.aggregates import (
    AggregateConfig,
    FeatureState,
    _advance,
    _entity_features,  # noqa: F401
    compute_features,
    snapshot,
)
from pipelines.events import FEEDBACK_KINDS, Rejection, parse_feedback, parse_impression_or_v1
from pipelines.parse import Rejects, _context_columns, concat_events

#: feedback partitions are numbered from here in a joint plan (impressions keep theirs)
FEEDBACK_PARTITION_BASE = 1 << 20

FEEDBACK_SCHEMA = pa.schema(
    [
        ("impression_id", pa.string()),
        ("ts", pa.int64()),
        ("kind", pa.string()),
        ("value", pa.float64()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        ("key", pa.binary()),
        ("raw", pa.binary()),
    ]
)
_CLOSED_SCHEMA = pa.schema([("impression_id", pa.string()), ("imp_ts", pa.int64()), ("clicked", pa.bool_())])
#: one row per dead-lettered feedback record (the shape of ``pipelines.parse.REJECT_SCHEMA``)
_DLQ_SCHEMA = pa.schema(
    [
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
        ("reason", pa.string()),
        ("key", pa.binary()),
        ("value", pa.binary()),
    ]
)
COUNTERS = (
    "impressions_accepted",
    "impressions_late",
    "impressions_duplicate",
    "impressions_behind_watermark",
    "feedback_accepted",
    "orphan_feedback",
    "feedback_before_impression",
    "duplicate_feedback",
    "late_feedback",
    "other_feedback",
    "positives",
    "negatives",
)


@dataclass(frozen=True)
class JoinConfig:
    """The attribution window and how long closed impressions are remembered (both event-time ms), and how
    long a partition may go without records before it stops holding the watermark (processing-time ms)."""

    window_ms: int = 3_600_000
    closed_retention_ms: int = 7 * 86_400_000
    idle_timeout_ms: int = 60_000
    features: AggregateConfig = AggregateConfig()

    def __post_init__(self) -> None:
        if self.window_ms <= 0 or self.closed_retention_ms < 0 or self.idle_timeout_ms < 0:
            raise ValueError(
                "need window_ms > 0, closed_retention_ms >= 0 and idle_timeout_ms >= 0, got "
                f"{self.window_ms}, {self.closed_retention_ms}, {self.idle_timeout_ms}"
            )


@dataclass
class JoinState:
    """Everything the join carries between micro-batches (see the module docstring)."""

    imp: FeatureState
    clk: FeatureState
    pending: pa.Table | None = None
    closed: pa.Table = field(default_factory=_CLOSED_SCHEMA.empty_table)
    #: newest event time read per (joint) partition
    partition_ts: dict[int, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in COUNTERS})
    #: processing time (the plan's clock, ms) each known partition last had valid records read, or was first seen
    partition_active_ms: dict[int, int] = field(default_factory=dict)
    #: the watermark of the last batch (kept: with idle partitions left out, the minimum could move back)
    last_watermark: int | None = None

    @classmethod
    def empty(cls) -> JoinState:
        return cls(FeatureState.empty(), FeatureState.empty())

    @property
    def watermark(self) -> int:
        if self.last_watermark is not None:
            return self.last_watermark
        return min(self.partition_ts.values()) if self.partition_ts else -1

    @property
    def open_count(self) -> int:
        return 0 if self.pending is None else self.pending.num_rows

    def to_arrow(self) -> dict[str, pa.Table]:
        out = {}
        for name, st in (("imp", self.imp), ("clk", self.clk)):
            for k, t in st.to_arrow().items():
                out[f"{name}_{k}"] = t
        meta = {
            b"partition_ts": json.dumps({str(p): int(t) for p, t in self.partition_ts.items()}).encode(),
            b"counts": json.dumps(self.counts).encode(),
            b"partition_active_ms": json.dumps({str(p): int(t) for p, t in self.partition_active_ms.items()}).encode(),
            b"watermark": json.dumps(self.last_watermark).encode(),
        }
        out["closed"] = self.closed.replace_schema_metadata(meta)
        if self.pending is not None:
            out["pending"] = self.pending
        return out

    @classmethod
    def from_arrow(cls, tables: dict[str, pa.Table]) -> JoinState:
        imp = FeatureState.from_arrow({"tail": tables["imp_tail"], "evicted": tables["imp_evicted"]})
        clk = FeatureState.from_arrow({"tail": tables["clk_tail"], "evicted": tables["clk_evicted"]})
        closed = tables["closed"]
        meta = closed.schema.metadata or {}
        st = cls(
            imp,
            clk,
            tables.get("pending"),
            closed.replace_schema_metadata(None).cast(_CLOSED_SCHEMA),
            {int(p): int(t) for p, t in json.loads(meta.get(b"partition_ts", b"{}")).items()},
        )
        st.counts.update(json.loads(meta.get(b"counts", b"{}")))
        # states saved before the idle timeout: every partition counts as active now, the watermark as it was
        st.partition_active_ms = {
            int(p): int(t) for p, t in json.loads(meta.get(b"partition_active_ms", b"{}")).items()
        }
        st.last_watermark = json.loads(meta.get(b"watermark", b"null"))
        return st


@dataclass
class JoinResult:
    examples: pa.Table  # labelled examples, sorted by label_ts
    dlq: pa.Table  # feedback to dead-letter (kafka_partition, kafka_offset, reason, key, value)
    state: JoinState
    stats: dict[str, int]


def _concat(tables: list[pa.Table | None]) -> pa.Table | None:
    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    return concat_events(tables)


def _sort(t: pa.Table) -> pa.Table:
    keys = [("ts", "ascending")] + [
        (k, "ascending") for k in ("kafka_partition", "kafka_offset") if k in t.column_names
    ]
    return t.sort_by(keys) if t.num_rows else t


def _impression_features(
    imps: pa.Table, state: JoinState, cfg: AggregateConfig
) -> tuple[pa.Table, FeatureState, dict[str, int]]:
    """Impression-side features of the new impressions (strictly before each; late ones dropped)."""
    events = imps.append_column("event_id", imps["impression_id"]).append_column(
        "label", pa.array(np.zeros(imps.num_rows, np.int8))
    )
    feats, new_imp, stats = compute_features(events, state.imp, cfg)
    return feats.drop_columns(["event_id", "label"]), new_imp, stats


def _click_features(feats: pa.Table, state: JoinState, clicks: pa.Table, cfg: AggregateConfig) -> pa.Table:
    """Positives and CTRs of ``feats``: the clicks that had arrived before each impression's time."""
    if feats.num_rows == 0:
        return feats
    tail = pa.concat_tables([state.clk.tail, clicks])
    qts = feats["ts"].to_numpy()
    lo = min(int(qts.min()), int(pc.min(tail["ts"]).as_py()) if tail.num_rows else int(qts.min()))
    t0 = lo - cfg.horizon_ms - 1
    m, smooth = cfg.prior_weight, cfg.prior_weight * cfg.prior_ctr
    for entity in ("user", "item"):
        got = _entity_features(tail, state.clk.evicted, entity, feats[f"{entity}_id"].combine_chunks(), qts, t0, cfg)
        for w in [n for n, _ in cfg.windows_ms] + ["all"]:
            pos = np.asarray(got[f"{entity}_imp_{w}"], np.int64)
            imp = feats[f"{entity}_imp_{w}"].to_numpy()
            feats = feats.set_column(feats.column_names.index(f"{entity}_pos_{w}"), f"{entity}_pos_{w}", pa.array(pos))
            feats = feats.set_column(
                feats.column_names.index(f"{entity}_ctr_{w}"), f"{entity}_ctr_{w}", pa.array((pos + smooth) / (imp + m))
            )
    return feats


def _dlq_rows(fb: pa.Table, mask: np.ndarray, reason: list[str]) -> pa.Table:
    rows = fb.filter(pa.array(mask))
    return pa.table(
        {
            "kafka_partition": rows["kafka_partition"],
            "kafka_offset": rows["kafka_offset"],
            "reason": pa.array(reason, pa.string()),
            "key": rows["key"],
            "value": rows["raw"],
        },
        schema=_DLQ_SCHEMA,
    )


def join_batch(
    impressions: pa.Table,
    feedback: pa.Table,
    state: JoinState,
    cfg: JoinConfig = JoinConfig(),
    *,
    partitions: Collection[int] | None = None,
    now_ms: int | None = None,
) -> JoinResult:
    """One micro-batch of the join (see the module docstring); the input state is not mutated.

    ``impressions``: parsed impression rows (``impression_id, ts, user_id, item_id`` + optional columns,
    ``kafka_partition``/``kafka_offset`` where they came from); ``feedback``: :data:`FEEDBACK_SCHEMA` rows
    (feedback partitions numbered from :data:`FEEDBACK_PARTITION_BASE`). ``partitions``: every joint
    partition of the micro-batch's plan; ``now_ms``: the plan's clock, for the idle timeout. Without them
    (a replay from tables, the evaluation) only the partitions read count.
    """
    W = cfg.window_ms
    stats = {k: 0 for k in COUNTERS}
    wm_before = state.watermark
    if "impression_id" not in impressions.column_names:  # no impressions in this micro-batch (feedback only)
        impressions = IMPRESSION_CORE.empty_table()
    imps = _sort(impressions)
    fb = _sort(feedback.cast(FEEDBACK_SCHEMA) if feedback.num_rows else FEEDBACK_SCHEMA.empty_table())

    # 1. duplicate impressions (already open or closed, or twice in the batch): dropped, counted
    if imps.num_rows:
        known = [t["impression_id"].combine_chunks() for t in (state.pending, state.closed) if t is not None]
        seen = (
            pc.is_in(imps["impression_id"], value_set=pa.concat_arrays(known)).to_numpy(zero_copy_only=False)
            if known
            else np.zeros(imps.num_rows, bool)
        )
        _, first = np.unique(imps["impression_id"].to_numpy(zero_copy_only=False), return_index=True)
        firsts = np.zeros(imps.num_rows, bool)
        firsts[first] = True
        dup = seen | ~firsts
        stats["impressions_duplicate"] = int(dup.sum())
        imps = imps.filter(pa.array(~dup))

    # 1b. impressions whose window closed before they arrived: dropped, counted, remembered as closed
    imps, behind = _split_behind(imps, wm_before, W)
    if behind is not None:
        stats["impressions_behind_watermark"] = behind.num_rows

    # 2. impression-side features; impressions too late for them are dropped here (no example)
    imps, new_imp, fstats = _impression_features(imps, state, cfg.features)
    stats["impressions_accepted"], stats["impressions_late"] = fstats["accepted"], fstats["late"]
    stats["impressions_duplicate"] += fstats["duplicates"]

    # 3. match feedback to impressions (open, new, or closed), in event-time order
    n_fb = fb.num_rows
    clicks_idx: list[int] = []
    click_imp_rows: list[tuple[str, int]] = []  # (source: "pending"/"new", row) of each accepted click
    reasons: dict[int, str] = {}
    if n_fb:
        open_ids = (
            {} if state.pending is None else {i: r for r, i in enumerate(state.pending["impression_id"].to_pylist())}
        )
        new_ids = {i: r for r, i in enumerate(imps["impression_id"].to_pylist())}
        open_ts = None if state.pending is None else state.pending["ts"].to_numpy()
        new_ts = imps["ts"].to_numpy() if imps.num_rows else np.zeros(0, np.int64)
        known_closed = state.closed if behind is None else pa.concat_tables([state.closed, behind])
        closed = {
            i: (t, c)
            for i, t, c in zip(
                known_closed["impression_id"].to_pylist(),
                known_closed["imp_ts"].to_pylist(),
                known_closed["clicked"].to_pylist(),
            )
        }
        clicked_now: set[str] = set()
        for j, (iid, ts, kind) in enumerate(
            zip(fb["impression_id"].to_pylist(), fb["ts"].to_pylist(), fb["kind"].to_pylist())
        ):
            if iid in open_ids:
                src, row, t_imp, was_clicked = "pending", open_ids[iid], int(open_ts[open_ids[iid]]), False
            elif iid in new_ids:
                src, row, t_imp, was_clicked = "new", new_ids[iid], int(new_ts[new_ids[iid]]), False
            elif iid in closed:
                src, row, (t_imp, was_clicked) = "closed", -1, closed[iid]
            else:
                stats["orphan_feedback"] += 1
                reasons[j] = f"orphan feedback: no impression {iid!r} known to the join"
                continue
            if ts < t_imp:
                stats["feedback_before_impression"] += 1
                reasons[j] = f"feedback before its impression: feedback ts {ts} < impression ts {t_imp}"
                continue
            if kind != "click":
                stats["other_feedback"] += 1
                continue
            if was_clicked or iid in clicked_now:
                stats["duplicate_feedback"] += 1
                continue
            if ts > t_imp + W or src == "closed":
                stats["late_feedback"] += 1
                continue
            clicked_now.add(iid)
            clicks_idx.append(j)
            click_imp_rows.append((src, row))
    stats["feedback_accepted"] = len(clicks_idx)
    dlq_idx = sorted(reasons)
    mask = np.zeros(n_fb, bool)
    mask[dlq_idx] = True
    dlq = _dlq_rows(fb, mask, [reasons[j] for j in dlq_idx]) if dlq_idx else _DLQ_SCHEMA.empty_table()

    # the accepted clicks as label-1 events of their impression's user and item, at the click time
    users, items = [], []
    for src, row in click_imp_rows:
        t = state.pending if src == "pending" else imps
        users.append(t["user_id"][row].as_py())
        items.append(t["item_id"][row].as_py())
    cidx = pa.array(clicks_idx, pa.int64())
    clicks = pa.table(
        {
            "event_id": fb["impression_id"].take(cidx),
            "ts": fb["ts"].take(cidx),
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.string()),
            "label": pa.array(np.ones(len(clicks_idx), np.int8)),
        }
    )

    # 4. click-side features of the new impressions (clicks arrived strictly before each), then the click
    # state advances
    feats = _click_features(imps, state, clicks, cfg.features)
    clk_combined = pa.concat_tables([state.clk.tail, clicks])
    clk_wm = max(state.clk.watermark, int(pc.max(clicks["ts"]).as_py()) if clicks.num_rows else -1)
    new_clk = _advance(clk_combined, state.clk.evicted, clk_wm, cfg.features)

    # 5. the watermark over every partition of the plan (the idle ones left out)
    partition_ts, active = dict(state.partition_ts), dict(state.partition_active_ms)
    for t in (impressions, feedback):
        if t.num_rows and "kafka_partition" in t.column_names:
            parts, ts = t["kafka_partition"].to_numpy(), t["ts"].to_numpy()
            for p in np.unique(parts):
                partition_ts[int(p)] = max(partition_ts.get(int(p), -1), int(ts[parts == p].max()))
                if now_ms is not None:  # active: it had valid records (garbage alone does not keep it so)
                    active[int(p)] = int(now_ms)
    wm = max(wm_before, _watermark(partition_ts, active, partitions, now_ms, cfg.idle_timeout_ms))

    # 6. positives now; negatives whose window closed; the rest stays open
    waiting = _concat([state.pending, feats if feats.num_rows else None])
    out = []
    closed_rows = []
    if waiting is not None and waiting.num_rows:
        ids = waiting["impression_id"].to_pylist()
        click_ts = {fb["impression_id"][j].as_py(): int(fb["ts"][j].as_py()) for j in clicks_idx}
        pos_mask = np.array([i in click_ts for i in ids], bool)
        ts = waiting["ts"].to_numpy()
        neg_mask = ~pos_mask & (ts + W < wm)
        if pos_mask.any():
            p = waiting.filter(pa.array(pos_mask))
            out.append(
                p.append_column("label", pa.array(np.ones(p.num_rows, np.int8))).append_column(
                    "label_ts", pa.array([click_ts[i] for i in p["impression_id"].to_pylist()], pa.int64())
                )
            )
        if neg_mask.any():
            n = waiting.filter(pa.array(neg_mask))
            out.append(
                n.append_column("label", pa.array(np.zeros(n.num_rows, np.int8))).append_column(
                    "label_ts", pa.array(n["ts"].to_numpy() + W, pa.int64())
                )
            )
        done = pos_mask | neg_mask
        closed_rows.append(
            pa.table(
                {
                    "impression_id": waiting["impression_id"].filter(pa.array(done)),
                    "imp_ts": waiting["ts"].filter(pa.array(done)),
                    "clicked": pa.array(pos_mask[done]),
                },
                schema=_CLOSED_SCHEMA,
            )
        )
        pending = waiting.filter(pa.array(~done))
        stats["positives"], stats["negatives"] = int(pos_mask.sum()), int(neg_mask.sum())
    else:
        pending = waiting
    if behind is not None:
        closed_rows.append(behind)
    closed_all = pa.concat_tables([state.closed, *closed_rows])
    if closed_all.num_rows and wm >= 0:  # forget closed impressions older than the retention
        closed_all = closed_all.filter(pc.greater_equal(closed_all["imp_ts"], wm - W - cfg.closed_retention_ms))
    examples = _concat(out)
    if examples is None:
        examples = pa.table(
            {
                "impression_id": pa.array([], pa.string()),
                "ts": pa.array([], pa.int64()),
                "label": pa.array([], pa.int8()),
                "label_ts": pa.array([], pa.int64()),
            }
        )
    else:
        examples = examples.sort_by([("label_ts", "ascending"), ("ts", "ascending"), ("impression_id", "ascending")])
        # v1 readers (the trainer, the evaluation) key examples by event_id
        examples = examples.add_column(0, "event_id", examples["impression_id"])
    new_state = JoinState(
        new_imp,
        new_clk,
        pending if pending is not None and pending.num_rows else (pending.slice(0, 0) if pending is not None else None),
        closed_all,
        partition_ts,
        {k: state.counts.get(k, 0) + v for k, v in stats.items()},
        active,
        wm,
    )
    return JoinResult(examples, dlq, new_state, stats)


def _split_behind(imps: pa.Table, wm: int, window_ms: int) -> tuple[pa.Table, pa.Table | None]:
    """The impressions still in time, and those whose window had closed before they arrived (``ts + W < wm``) as
    closed rows (None when there are none)."""
    if not imps.num_rows or wm < 0:
        return imps, None
    late = pc.less(pc.add(imps["ts"], window_ms), wm)
    if not pc.any(late).as_py():
        return imps, None
    rows = imps.filter(late)
    closed = pa.table(
        {
            "impression_id": rows["impression_id"],
            "imp_ts": rows["ts"],
            "clicked": pa.array(np.zeros(rows.num_rows, bool)),
        },
        schema=_CLOSED_SCHEMA,
    )
    return imps.filter(pc.invert(late)), closed


def _watermark(
    partition_ts: dict[int, int],
    active: dict[int, int],
    partitions: Collection[int] | None,
    now_ms: int | None,
    idle_timeout_ms: int,
) -> int:
    """The minimum newest event time over the partitions that hold the watermark.

    ``active`` maps a partition to the processing time it last had records read; a partition of the plan
    seen for the first time starts its idle clock now (it is added). With a plan (``partitions``,
    ``now_ms``), every partition holds the watermark, at -1 until it is read, unless it has been idle for
    more than ``idle_timeout_ms``. When every partition is idle the stream is quiet, and the partitions read
    decide, as they do without a plan.

    >>> active = {0: 1_000}
    >>> _watermark({0: 50}, active, [0, 1], now_ms=1_000, idle_timeout_ms=60_000)  # 1 not read yet
    -1
    >>> active[0] = 62_000
    >>> _watermark({0: 50}, active, [0, 1], now_ms=62_000, idle_timeout_ms=60_000)  # 1 idle for 61 s
    50
    """
    if partitions is not None and now_ms is not None:
        for p in partitions:
            active.setdefault(int(p), int(now_ms))
        holding = [p for p in set(active) | set(partition_ts) if now_ms - active.get(p, now_ms) <= idle_timeout_ms]
        if holding:
            return min(partition_ts.get(p, -1) for p in holding)
    return min(partition_ts.values()) if partition_ts else -1


# ---------------------------------------------------------------------------------------------------------
# parsing the two topics into the join's tables (record by record through the contract's parsers)

IMPRESSION_CORE = pa.schema(
    [
        ("impression_id", pa.string()),
        ("ts", pa.int64()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("request_id", pa.string()),
        ("position", pa.int64()),
        ("kafka_partition", pa.int32()),
        ("kafka_offset", pa.int64()),
    ]
)


def _pylists(values, keys) -> tuple[list, list]:
    values = values.to_pylist() if isinstance(values, (pa.Array, pa.ChunkedArray)) else list(values)
    if keys is None:
        return values, [None] * len(values)
    return values, keys.to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) else list(keys)


def parse_impressions(
    values, *, partition: int, offsets, keys=None, now_ms: int | None = None
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """``(impressions, immediate feedback of v1 events, rejections)`` of one batch of one partition.

    v1 labelled records are accepted (:func:`reloop.events.parse_impression_or_v1`); their clicks come back
    as feedback rows on the same partition and offset (so the join's ordering stays deterministic).
    """
    values, keys = _pylists(values, keys)
    cols: dict[str, list] = {n: [] for n in IMPRESSION_CORE.names}
    contexts: list[dict] = []
    fcols: dict[str, list] = {n: [] for n in FEEDBACK_SCHEMA.names}
    bad = Rejects(partition)
    for off, key, raw in zip(offsets, keys, values):
        got = parse_impression_or_v1(raw, now_ms=now_ms) if raw is not None else None
        if got is None or isinstance(got, Rejection):
            bad.add(off, key, raw, got)
            continue
        imp, fb = got
        for n, v in (
            ("impression_id", imp.impression_id),
            ("ts", imp.ts),
            ("user_id", imp.user_id),
            ("item_id", imp.item_id),
            ("request_id", imp.request_id),
            ("position", imp.position),
            ("kafka_partition", partition),
            ("kafka_offset", int(off)),
        ):
            cols[n].append(v)
        contexts.append(imp.context)
        if fb is not None:
            _add_feedback(fcols, fb, partition, off, key, raw)
    imps = pa.table({n: pa.array(cols[n], IMPRESSION_CORE.field(n).type) for n in IMPRESSION_CORE.names})
    if any(contexts):
        for name, arr in _context_columns(contexts).items():
            imps = imps.append_column(name, arr)
    return imps, _feedback_table(fcols), bad.table()


def _add_feedback(fcols: dict[str, list], fb, partition: int, off, key: bytes | None, raw: bytes | None) -> None:
    """One feedback row (a ``FEEDBACK_SCHEMA`` row: the record, where it was read, its key and bytes)."""
    for n, v in (
        ("impression_id", fb.impression_id),
        ("ts", fb.ts),
        ("kind", fb.kind),
        ("value", fb.value),
        ("kafka_partition", partition),
        ("kafka_offset", int(off)),
        ("key", key),
        ("raw", raw),
    ):
        fcols[n].append(v)


def _feedback_table(fcols: dict[str, list]) -> pa.Table:
    return pa.table({n: pa.array(fcols[n], FEEDBACK_SCHEMA.field(n).type) for n in FEEDBACK_SCHEMA.names})


def parse_feedback_records(
    values, *, partition: int, offsets, keys=None, now_ms: int | None = None, kinds: tuple[str, ...] | None = None
) -> tuple[pa.Table, pa.Table]:
    """``(feedback rows, rejections)`` of one batch of one feedback partition (``partition`` as given:
    the caller numbers feedback partitions from :data:`FEEDBACK_PARTITION_BASE` for the join)."""
    values, keys = _pylists(values, keys)
    fcols: dict[str, list] = {n: [] for n in FEEDBACK_SCHEMA.names}
    bad = Rejects(partition)
    for off, key, raw in zip(offsets, keys, values):
        fb = parse_feedback(raw, now_ms=now_ms, kinds=kinds or FEEDBACK_KINDS) if raw is not None else None
        if fb is None or isinstance(fb, Rejection):
            bad.add(off, key, raw, fb)
            continue
        _add_feedback(fcols, fb, partition, off, key, raw)
    return _feedback_table(fcols), bad.table()


def join_snapshot(
    state: JoinState, cfg: AggregateConfig, users: list[str], items: list[str]
) -> tuple[pa.Table, pa.Table]:
    """Online features of ``users`` and ``items`` as of just after the newest impression, with the
    join's definition of positives (clicks arrived by then): what an impression then would see."""
    as_of = state.imp.watermark + 1
    u, i = snapshot(state.imp, as_of, cfg, users=users, items=items)
    cu, ci = snapshot(state.clk, as_of, cfg, users=users, items=items)
    m, smooth = cfg.prior_weight, cfg.prior_weight * cfg.prior_ctr
    out = []
    for entity, t, c in (("user", u, cu), ("item", i, ci)):
        for w in [n for n, _ in cfg.windows_ms] + ["all"]:
            pos = c[f"{entity}_imp_{w}"].to_numpy()
            t = t.set_column(t.column_names.index(f"{entity}_pos_{w}"), f"{entity}_pos_{w}", pa.array(pos))
            t = t.set_column(
                t.column_names.index(f"{entity}_ctr_{w}"),
                f"{entity}_ctr_{w}",
                pa.array((pos + smooth) / (t[f"{entity}_imp_{w}"].to_numpy() + m)),
            )
        out.append(t)
    return out[0], out[1]
