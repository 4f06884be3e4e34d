"""A seeded synthetic event stream with controlled, documented drift.

The stream has the same columns as :func:`reloop.datasets.load_dataset`
(``event_id, ts, user_id, item_id, label`` then context columns) and knows
where its drift is, so detectors can be scored by detection delay.

The world
---------
``users`` users with Dirichlet topic interests over ``topics`` topics;
``items`` items, each with one topic, a Zipf popularity and a quality.
Each event draws a user (Zipf activity) and an item (by popularity), and
clicks with probability::

    sigmoid(logit(ctr) + affinity * (topics * interest[user, topic[item]] - 1) + quality[item])

Two *concepts* exist: the old one (0) and the new one (1). Which one an
event follows is set by the *mode*, from event index ``at`` on:

- ``abrupt``: every event from ``at`` on follows the new concept;
- ``gradual``: the chance of the new concept rises linearly from 0 at ``at``
  to 1 at ``at + width``;
- ``recurring``: old and new alternate every ``period`` events from ``at`` on.

What changes between the concepts is set by the *kind*:

- ``ctr``: the click-rate level (``delta`` added to the logit);
- ``interest``: each user's interests are rotated to other topics, so the
  same user now likes different items (overall CTR roughly unchanged);
- ``popularity``: items' popularity is re-ranked, so other items are shown
  (covariate shift: click probabilities given user and item do not change).

Scenario names are ``<mode>_<kind>`` (e.g. ``abrupt_ctr``) or ``stable``.
Context columns: ``topic`` (int32), ``item_pop`` (float64, log of the item's
*historical* popularity, i.e. under the old concept, scaled so the mean item
is 0), ``price`` (float64, per item), ``hour`` (int32, of the event time),
``device`` (string). Besides the table, the generator returns for each event
the true click probability ``p_true`` and ``p_stale``, what a perfect model
of the old concept predicts: the natural "served model" for drift tests.

>>> s = generate("abrupt_ctr", n=2000, seed=7, at=1000)
>>> s.table.column_names
['event_id', 'ts', 'user_id', 'item_id', 'label', 'topic', 'item_pop', 'price', 'hour', 'device']
>>> s.shift_start, s.shift_end, s.table.num_rows
(1000, 1000, 2000)
>>> bool(s.p_true[1000:].mean() > s.p_true[:1000].mean())
True
>>> generate("abrupt_ctr", n=50, seed=7).table.equals(generate("abrupt_ctr", n=50, seed=7).table)
True
>>> parse_spec("synthetic:gradual_interest?n=5000&seed=3&width=800")
('gradual_interest', {'n': 5000, 'seed': 3, 'width': 800})
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import erf, sqrt
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pyarrow as pa

from features import windows
from online_models.errors import DatasetError
from pipelines.events import FEEDBACK_REQUIRED, IMPRESSION_REQUIRED, REQUIRED

PREFIX = "synthetic:"
MODES = ("abrupt", "gradual", "recurring")
KINDS = ("ctr", "interest", "popularity")
SCENARIOS = ("stable",) + tuple(f"{m}_{k}" for m in MODES for k in KINDS)
#: the schema-metadata key under which the ground truth travels with the table
METADATA_KEY = b"reloop.synthetic"
DEVICES = ("web", "ios", "android")


class SyntheticError(DatasetError):
    """A synthetic spec or parameter that is not valid; the message names it and the allowed values."""


@dataclass(frozen=True)
class SyntheticParams:
    """Every knob of the generator; the defaults give a ~10% CTR stream with a strong, realistic shift."""

    n: int = 100_000
    seed: int = 0
    #: first event index of the new concept (default: the middle of the stream)
    at: int | None = None
    #: gradual: events over which the new concept takes over
    width: int = 5_000
    #: recurring: events per phase (old, new, old, ...)
    period: int = 5_000
    users: int = 1_000
    items: int = 500
    topics: int = 8
    ctr: float = 0.10
    #: ctr kind: logit shift of the new concept (+0.8 takes 10% to about 20%)
    delta: float = 0.8
    #: strength of user interest in the click logit
    affinity: float = 0.6
    #: Dirichlet concentration of user interests (small = peaky interests)
    interest_alpha: float = 0.3
    zipf_items: float = 1.1
    zipf_users: float = 0.8
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00Z
    #: mean gap between events (exponential inter-arrival times)
    gap_ms: float = 1_000.0
    #: delay of the clicks (``exp:20m``, see :func:`parse_delay`); empty = labels known at once
    delay: str = ""

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise SyntheticError(f"n must be positive, got {self.n}")
        for name in ("width", "period", "users", "items", "topics"):
            if getattr(self, name) <= 0:
                raise SyntheticError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.ctr < 1.0:
            raise SyntheticError(f"ctr must be in (0, 1), got {self.ctr}")
        if self.at is not None and not 0 <= self.at <= self.n:
            raise SyntheticError(f"at must be in [0, n={self.n}], got {self.at}")
        if self.delay:
            parse_delay(self.delay)


@dataclass
class SyntheticStream:
    """A generated stream and its ground truth."""

    scenario: str
    params: SyntheticParams
    table: pa.Table
    #: first event index under (some of) the new concept; None for ``stable``
    shift_start: int | None
    #: first index where the new concept is fully in force (== start for abrupt)
    shift_end: int | None
    p_true: np.ndarray = field(repr=False)
    p_stale: np.ndarray = field(repr=False)
    #: 1 where the event follows the new concept
    concept: np.ndarray = field(repr=False)
    #: per event, how long after the impression its click arrives (ms; -1 for negatives); None: no delay
    delays_ms: np.ndarray | None = field(default=None, repr=False)

    def delayed(self) -> tuple[pa.Table, pa.Table]:
        """``(impressions, feedback)``: the stream with its clicks arriving ``delays_ms`` late."""
        if self.delays_ms is None:
            raise SyntheticError("this stream has no delay; generate it with delay=... (e.g. exp:20m)")
        return split_delayed(self.table, self.delays_ms)

    @property
    def shift_ts(self) -> int | None:
        """Event time (epoch ms) of the first shifted event."""
        if self.shift_start is None or self.shift_start >= self.table.num_rows:
            return None
        return int(self.table.column("ts")[self.shift_start].as_py())

    def ground_truth(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.params.seed,
            "n": self.params.n,
            "shift_start": self.shift_start,
            "shift_end": self.shift_end,
            "shift_ts": self.shift_ts,
            "delay": self.params.delay or None,
        }


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``synthetic:<scenario>?k=v&...`` into the scenario and typed parameters."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    scenario, _, query = body.partition("?")
    if scenario not in SCENARIOS:
        raise SyntheticError(f"unknown synthetic scenario {scenario!r}; allowed: {', '.join(SCENARIOS)}")
    fields = SyntheticParams.__dataclass_fields__
    params: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in fields:
            raise SyntheticError(f"unknown synthetic parameter {key!r}; allowed: {', '.join(fields)}")
        if fields[key].type in ("str",):
            params[key] = value
            continue
        try:
            params[key] = float(value) if fields[key].type in ("float",) else int(float(value))
        except ValueError:
            raise SyntheticError(f"synthetic parameter {key}={value!r} is not a number") from None
    return scenario, params


def load_synthetic(spec: str, limit: int | None = None) -> pa.Table:
    """The table of a ``synthetic:...`` dataset spec, ground truth in the schema metadata."""
    scenario, params = parse_spec(spec)
    table = generate(scenario, **params).table
    if limit is not None:
        if limit <= 0:
            raise SyntheticError(f"limit must be positive, got {limit}")
        table = table.slice(0, limit)
    return table


def ground_truth(table: pa.Table) -> dict[str, Any] | None:
    """The ground truth stored in a synthetic table's metadata (None for other tables)."""
    meta = table.schema.metadata or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def _zipf_weights(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return rng.permutation(w / w.sum())


def _concept(mode: str, n: int, at: int, p: SyntheticParams, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    idx = np.arange(n)
    if mode == "abrupt":
        return (idx >= at).astype(np.int8), at
    if mode == "gradual":
        prob = np.clip((idx - at + 1) / p.width, 0.0, 1.0)
        return (rng.random(n) < prob).astype(np.int8), min(at + p.width, n)
    # recurring: new concept in phases 0, 2, 4, ... after ``at``
    phase = (idx - at) // p.period
    return ((idx >= at) & (phase % 2 == 0)).astype(np.int8), at


def generate(scenario: str = "stable", **overrides: Any) -> SyntheticStream:
    """Generate a stream; ``overrides`` are :class:`SyntheticParams` fields. Same seed, same stream."""
    if scenario not in SCENARIOS:
        raise SyntheticError(f"unknown synthetic scenario {scenario!r}; allowed: {', '.join(SCENARIOS)}")
    try:
        p = SyntheticParams(**overrides)
    except TypeError as e:
        raise SyntheticError(f"{e}; allowed: {', '.join(SyntheticParams.__dataclass_fields__)}") from None
    rng = np.random.default_rng(p.seed)
    n, K = p.n, p.topics

    # the world (old concept), then its shifted twin
    interest0 = rng.dirichlet(np.full(K, p.interest_alpha), size=p.users)  # (U, K)
    rotate = rng.integers(1, K, size=p.users)  # never the identity
    interest1 = interest0[np.arange(p.users)[:, None], (np.arange(K)[None, :] - rotate[:, None]) % K]
    item_topic = rng.integers(0, K, size=p.items)
    pop0 = _zipf_weights(p.items, p.zipf_items, rng)
    pop1 = rng.permutation(pop0)
    quality = rng.normal(0.0, 0.3, size=p.items)
    price = np.round(rng.lognormal(3.0, 0.6, size=p.items), 2)
    activity = _zipf_weights(p.users, p.zipf_users, rng)

    if scenario == "stable":
        mode, kind = "abrupt", "ctr"
        concept, at, end = np.zeros(n, np.int8), None, None
    else:
        mode, kind = scenario.split("_", 1)
        at = n // 2 if p.at is None else p.at
        concept, end = _concept(mode, n, at, p, rng)
    new = concept.astype(bool)

    users = rng.choice(p.users, size=n, p=activity)
    items = rng.choice(p.items, size=n, p=pop0)
    if kind == "popularity":
        items = np.where(new, rng.choice(p.items, size=n, p=pop1), items)

    base = np.log(p.ctr / (1 - p.ctr))
    topic = item_topic[items]
    aff0 = p.affinity * (K * interest0[users, topic] - 1.0)
    aff1 = p.affinity * (K * interest1[users, topic] - 1.0) if kind == "interest" else aff0
    shift = p.delta if kind == "ctr" else 0.0
    logit_stale = base + aff0 + quality[items]
    logit_true = np.where(new, base + shift + aff1 + quality[items], logit_stale)
    p_stale = 1.0 / (1.0 + np.exp(-logit_stale))
    p_true = 1.0 / (1.0 + np.exp(-logit_true))
    label = (rng.random(n) < p_true).astype(np.int8)

    ts = p.start_ms + np.cumsum(rng.exponential(p.gap_ms, size=n)).astype(np.int64)
    hour = ((ts // 3_600_000) % 24).astype(np.int32)
    device = np.asarray(DEVICES)[rng.choice(len(DEVICES), size=n, p=[0.5, 0.3, 0.2])]
    item_pop = np.log(pop0[items] * p.items)

    table = pa.table(
        {
            "event_id": pa.array([f"syn{p.seed}-{i}" for i in range(n)], pa.string()),
            "ts": pa.array(ts, pa.int64()),
            "user_id": pa.array(np.char.add("u", users.astype(str)), pa.string()),
            "item_id": pa.array(np.char.add("i", items.astype(str)), pa.string()),
            "label": pa.array(label, pa.int8()),
            "topic": pa.array(topic.astype(np.int32)),
            "item_pop": pa.array(item_pop, pa.float64()),
            "price": pa.array(price[items], pa.float64()),
            "hour": pa.array(hour),
            "device": pa.array(device.astype(str), pa.string()),
        }
    )
    # drawn from a generator of its own, so adding a delay leaves every other column of the stream unchanged
    delays = (
        np.where(label == 1, parse_delay(p.delay).sample(n, np.random.default_rng([p.seed, 1])), -1)
        if p.delay
        else None
    )
    stream = SyntheticStream(scenario, p, table, at, end, p_true, p_stale, concept, delays)
    stream.table = table.replace_schema_metadata({METADATA_KEY: json.dumps(stream.ground_truth()).encode()})
    return stream


# ---------------------------------------------------------------------------------------------------------
# Delayed feedback: any labelled table -> an impression stream plus a (later) click stream

DELAY_KINDS = ("none", "fixed", "exp", "uniform", "lognormal")


def parse_duration_ms(text: str) -> int:
    """:func:`features.windows.parse_duration_ms`, whose error is a :class:`SyntheticError` here."""
    try:
        return windows.parse_duration_ms(text)
    except ValueError as e:
        raise SyntheticError(str(e)) from None


@dataclass(frozen=True)
class DelaySpec:
    """A click-delay distribution (ms). ``sample`` is seeded by the caller's generator.

    - ``none``: 0 (the click at the impression's instant: v1 semantics);
    - ``fixed:D``: always D;
    - ``exp:MEAN``: exponential with mean MEAN (Chapelle 2014's delayed-conversion model);
    - ``uniform:A:B``: uniform in [A, B];
    - ``lognormal:MEDIAN:SIGMA``: log-normal with that median and log-scale sigma (a heavy tail).
    """

    kind: str
    a_ms: int = 0
    b_ms: int = 0
    sigma: float = 0.0

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "none":
            return np.zeros(n, np.int64)
        if self.kind == "fixed":
            return np.full(n, self.a_ms, np.int64)
        if self.kind == "exp":
            return np.round(rng.exponential(self.a_ms, size=n)).astype(np.int64)
        if self.kind == "uniform":
            return rng.integers(self.a_ms, self.b_ms + 1, size=n).astype(np.int64)
        return np.round(self.a_ms * np.exp(self.sigma * rng.standard_normal(n))).astype(np.int64)

    def cdf(self, t_ms: np.ndarray | float) -> np.ndarray:
        """P(delay <= t): the true fraction of a positive's clicks that arrived after ``t`` ms."""
        t = np.asarray(t_ms, float)
        if self.kind == "none":
            return (t >= 0).astype(float)
        if self.kind == "fixed":
            return (t >= self.a_ms).astype(float)
        if self.kind == "exp":
            return np.where(t < 0, 0.0, 1.0 - np.exp(-np.maximum(t, 0) / max(self.a_ms, 1)))
        if self.kind == "uniform":
            return np.clip((t - self.a_ms) / max(self.b_ms - self.a_ms, 1), 0.0, 1.0)

        z = (np.log(np.maximum(t, 1e-9) / self.a_ms)) / (self.sigma * sqrt(2.0))
        return np.where(t <= 0, 0.0, 0.5 * (1.0 + np.vectorize(erf)(z)))


def parse_delay(spec: str) -> DelaySpec:
    """``exp:20m`` -> DelaySpec('exp', 1200000); see :class:`DelaySpec` for the kinds.

    >>> parse_delay("exp:20m"), parse_delay("uniform:1m:5m").b_ms, parse_delay("lognormal:10m:1.5").sigma
    (DelaySpec(kind='exp', a_ms=1200000, b_ms=0, sigma=0.0), 300000, 1.5)
    """
    kind, *args = spec.strip().lower().split(":")
    n_args = {"none": 0, "fixed": 1, "exp": 1, "uniform": 2, "lognormal": 2}
    if kind not in n_args:
        raise SyntheticError(
            f"unknown delay distribution {spec!r}; allowed: none, fixed:D, exp:MEAN, "
            f"uniform:A:B, lognormal:MEDIAN:SIGMA (durations like 90s, 20m, 1h)"
        )
    if len(args) != n_args[kind]:
        raise SyntheticError(f"delay {spec!r}: {kind} takes {n_args[kind]} argument(s), got {len(args)}")
    if kind == "none":
        return DelaySpec("none")
    a = parse_duration_ms(args[0])
    if kind == "uniform":
        b = parse_duration_ms(args[1])
        if b < a:
            raise SyntheticError(f"delay {spec!r}: uniform needs A <= B")
        return DelaySpec(kind, a, b)
    if kind == "lognormal":
        try:
            sigma = float(args[1])
        except ValueError:
            raise SyntheticError(f"delay {spec!r}: SIGMA must be a number") from None
        if not (a > 0 and np.isfinite(sigma) and sigma > 0):
            raise SyntheticError(f"delay {spec!r}: lognormal needs MEDIAN > 0 and SIGMA > 0")
        return DelaySpec(kind, a, sigma=sigma)
    if kind == "exp" and a <= 0:
        raise SyntheticError(f"delay {spec!r}: the mean must be positive")
    return DelaySpec(kind, a)


#: columns of the impression / feedback tables of a delayed stream (then any context columns)
IMPRESSION_COLUMNS = IMPRESSION_REQUIRED
FEEDBACK_COLUMNS = FEEDBACK_REQUIRED


def split_delayed(table: pa.Table, delays_ms: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """``(impressions, feedback)`` of a labelled, time-sorted event table and per-row click delays.

    Every row is an impression (its ``event_id`` the ``impression_id``, context columns kept, ``label``
    dropped: the stream does not know it); every row with ``label == 1`` a ``click`` at ``ts + delay``.
    Feedback is sorted by its own time (ties: impression order).
    """
    context = [c for c in table.column_names if c not in REQUIRED]
    imps = pa.table(
        {
            "impression_id": table["event_id"],
            "ts": table["ts"],
            "user_id": table["user_id"],
            "item_id": table["item_id"],
            **{c: table[c] for c in context},
        }
    )
    pos = np.flatnonzero(table["label"].to_numpy(zero_copy_only=False) == 1)
    click_ts = table["ts"].to_numpy()[pos] + np.asarray(delays_ms, np.int64)[pos]
    order = np.argsort(click_ts, kind="stable")
    fb = pa.table(
        {
            "impression_id": table["event_id"].take(pa.array(pos[order])),
            "ts": pa.array(click_ts[order], pa.int64()),
            "kind": pa.array(["click"] * len(pos), pa.string()),
        }
    )
    return imps.combine_chunks(), fb


def label_delay(table: pa.Table, spec: str | DelaySpec, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Any labelled dataset as an impression stream plus a click stream delayed by ``spec`` (seeded).

    >>> t = pa.table({"event_id": ["a", "b", "c"], "ts": [0, 10, 20], "user_id": ["u"] * 3,
    ...               "item_id": ["i", "j", "k"], "label": pa.array([1, 0, 1], pa.int8())})
    >>> imps, fb = label_delay(t, "fixed:1s")
    >>> imps.column_names, fb.to_pydict()
    (['impression_id', 'ts', 'user_id', 'item_id'], {'impression_id': ['a', 'c'], 'ts': [1000, 1020], 'kind': ['click', 'click']})
    """
    d = parse_delay(spec) if isinstance(spec, str) else spec
    return split_delayed(table, d.sample(table.num_rows, np.random.default_rng(seed)))
