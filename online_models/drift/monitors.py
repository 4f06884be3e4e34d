"""Drift monitors: they only detect.

Two families, one interface (``update(x, ts) -> Detection | None``,
``state_dict()`` / ``load_state_dict()``, ``reset()``):

- :class:`DetectorMonitor` wraps a River detector on a per-event signal of
  the served model: ``logloss``, ``error`` (0/1 at threshold 0.5) or
  ``click`` (the label, i.e. the click rate). Kinds: ``adwin``,
  ``page_hinkley``, ``kswin`` (any signal) and ``ddm``, ``eddm``, ``hddm_a``,
  ``hddm_w`` (0/1 signals only).
- :class:`PSIMonitor` and :class:`KSMonitor` compare the distribution of a
  numeric value (the prediction, or a feature) with a reference window:
  ``mode="window"`` tests each tumbling window of ``window_size`` events;
  ``mode="decay"`` keeps exponentially decayed bin counts (half-life
  ``half_life`` events) and tests every ``check_every`` events.

Every monitor ignores its first ``warmup`` events for alarms (it still
learns from them). :class:`MonitorSuite` turns a (prediction, label,
features) record into the signals and feeds every monitor.

State is explicit and JSON-able. River's ADWIN and HDDM_W keep their state
in compiled (Rust) code that cannot be read, and KSWIN carries a random
generator; for those the checkpoint keeps the last ``tail`` inputs and a
restore replays them into a fresh detector (an approximation: the window is
cut to the tail). The other kinds restore exactly. Cost per update (2-core
laptop): ADWIN, Page-Hinkley, DDM, EDDM about 2-3 us; HDDM_A/HDDM_W about
14 us; PSI/KS about 1 us (window) or 3 us (decay); KSWIN about 1 ms (a KS
test on every update), so it is supported but not in the defaults.

>>> m = DetectorMonitor("page_hinkley", "logloss", params={"threshold": 5.0, "mode": "up"}, warmup=100)
>>> hits = [m.update(0.1 if i < 300 else 0.9, ts=i) for i in range(400)]
>>> first = next(i for i, h in enumerate(hits) if h is not None)
>>> first, hits[first].level, hits[first].detector
(306, 'drift', 'page_hinkley:logloss')
>>> m2 = DetectorMonitor("page_hinkley", "logloss", params={"threshold": 5.0, "mode": "up"})
>>> m2.load_state_dict(json.loads(json.dumps(m.state_dict())))
>>> m2.update(0.9, ts=400) == m.update(0.9, ts=400)
True
"""

from __future__ import annotations

import bisect
import importlib
import json  # noqa: F401  (the module doctest uses it)
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
from river import drift
from river.base import Base
from river.drift import binary

from online_models.drift.defaults import DEFAULT_MONITORS, PREDICTION  # noqa: F401  (re-exported)
from online_models.drift.records import Detection, Level
from online_models.errors import ReloopError

PERFORMANCE_METRICS = ("logloss", "error", "click")
DETECTORS: dict[str, type] = {
    "adwin": drift.ADWIN,
    "page_hinkley": drift.PageHinkley,
    "kswin": drift.KSWIN,
    "ddm": binary.DDM,
    "eddm": binary.EDDM,
    "hddm_a": binary.HDDMA,
    "hddm_w": binary.HDDMW,
}
BINARY_ONLY = frozenset({"ddm", "eddm", "hddm_a", "hddm_w"})
#: kinds whose whole state is plain Python attributes, restored exactly
EXACT_STATE = frozenset({"page_hinkley", "ddm", "eddm", "hddm_a"})
DISTRIBUTION_KINDS = ("psi", "ks")
MONITOR_KINDS = tuple(DETECTORS) + DISTRIBUTION_KINDS
EPS = 1e-7


class MonitorError(ReloopError, ValueError):
    """A monitor configured with an unknown kind, metric or parameter; the message lists the allowed values."""


# --------------------------------------------------------------------------- signals


def event_signals(p: float, label: int) -> dict[str, float]:
    """The per-event performance signals of one labelled prediction.

    >>> s = event_signals(0.8, 1); round(s["logloss"], 4), s["error"], s["click"], s["prediction"]
    (0.2231, 0.0, 1.0, 0.8)
    """
    q = min(max(float(p), EPS), 1.0 - EPS)
    y = 1.0 if label else 0.0
    return {
        "logloss": -(y * math.log(q) + (1.0 - y) * math.log(1.0 - q)),
        "error": float((q >= 0.5) != bool(label)),
        "click": y,
        PREDICTION: float(p),
    }


def batch_signals(p: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`event_signals` of a whole batch, as arrays (the same numbers, bit for bit).

    The logarithms go through ``math.log`` (numpy's vectorised log may differ from it in the last bit, and a
    detector's state must not depend on which path fed it); everything else is array arithmetic.

    >>> s = batch_signals(np.array([0.8, 0.1]), np.array([1, 1]))
    >>> [round(v, 4) for v in s["logloss"].tolist()], s["error"].tolist()
    ([0.2231, 2.3026], [0.0, 1.0])
    """
    p = np.asarray(p, dtype=np.float64)
    y = (np.asarray(labels) != 0).astype(np.float64)
    q = np.minimum(np.maximum(p, EPS), 1.0 - EPS)
    log_q = np.array([math.log(v) for v in q.tolist()])
    log_1q = np.array([math.log(1.0 - v) for v in q.tolist()])
    logloss = -(y * log_q + (1.0 - y) * log_1q)
    return {"logloss": logloss, "error": ((q >= 0.5) != (y > 0)).astype(np.float64), "click": y, PREDICTION: p}


# --------------------------------------------------------------------------- River state codec


def _encode(v: Any) -> Any:
    """Encode River detector attributes as JSON; bound methods are rebuilt by the constructor."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(v, Base):
        cls = type(v)
        return {
            "__river__": f"{cls.__module__}:{cls.__qualname__}",
            "state": {k: _encode(x) for k, x in vars(v).items() if not callable(x)},
        }
    raise MonitorError(f"cannot checkpoint attribute of type {type(v).__name__}")


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    if isinstance(v, dict) and "__river__" in v:
        module, _, qualname = v["__river__"].partition(":")
        # only River's own classes are rebuilt: a checkpoint must never name arbitrary code
        if not module.startswith("river."):
            raise MonitorError(f"checkpoint names a non-River class {v['__river__']!r}")
        cls = getattr(importlib.import_module(module), qualname)
        if not (isinstance(cls, type) and issubclass(cls, Base)):
            raise MonitorError(f"checkpoint names {v['__river__']!r}, which is not a River estimator")
        obj = cls.__new__(cls)
        obj.__dict__.update({k: _decode(x) for k, x in v["state"].items()})
        return obj
    return v


# --------------------------------------------------------------------------- River detector monitors


class DetectorMonitor:
    """A River drift detector on one per-event signal, with warm-up, window bookkeeping and checkpoints.

    ``params`` are the River detector's own constructor arguments (see River's docs,
    e.g. ADWIN ``delta``, PageHinkley ``threshold``/``delta``/``mode``, DDM
    ``warm_start``/``warning_threshold``/``drift_threshold``). DDM-family
    detectors also raise ``warning`` detections, once per warning episode.
    """

    family = "performance"

    def __init__(
        self,
        kind: str,
        metric: str = "logloss",
        params: Mapping[str, Any] | None = None,
        warmup: int = 1000,
        name: str | None = None,
        tail: int = 5000,
    ) -> None:
        if kind not in DETECTORS:
            raise MonitorError(f"unknown detector kind {kind!r}; allowed: {', '.join(DETECTORS)}")
        if kind in BINARY_ONLY and metric not in ("error", "click"):
            raise MonitorError(f"{kind} needs a 0/1 signal: metric must be 'error' or 'click', got {metric!r}")
        if warmup < 0 or tail < 1:
            raise MonitorError(f"warmup must be >= 0 and tail >= 1, got warmup={warmup}, tail={tail}")
        self.kind, self.metric, self.params = kind, metric, dict(params or {})
        self.warmup, self.tail = warmup, tail
        self.name = name or f"{kind}:{metric}"
        try:
            DETECTORS[kind](**self.params)
        except TypeError as e:
            raise MonitorError(f"{self.name}: bad detector params {self.params}: {e}") from None
        self.reset()

    def reset(self) -> None:
        """Forget everything learned (e.g. after a new model is deployed)."""
        self._det = DETECTORS[self.kind](**self.params)
        self.n = 0
        self.n_detections = 0
        self._win_n, self._win_sum = 0, 0.0
        self._ts_start: int | None = None
        self._ts_last: int | None = None
        self._warning = False
        self._tail: deque[float] | None = None if self.kind in EXACT_STATE else deque(maxlen=self.tail)

    def _stat(self) -> tuple[float | None, float | None, int]:
        """(statistic, threshold, window) of the detector right now, for the alert body."""
        d, mean = self._det, (self._win_sum / self._win_n if self._win_n else None)
        if self.kind == "adwin":
            return float(d.estimation), float(self.params.get("delta", d.delta)), int(d.width)
        if self.kind == "page_hinkley":
            up = d._sum_increase - d._min_increase
            down = d._max_decrease - d._sum_decrease
            stat = {"up": up, "down": down}.get(d.mode, max(up, down))
            return float(stat), float(d.threshold), self._win_n
        if self.kind == "ddm":
            p = d._p.get()
            n = max(d._p.n, 1.0)
            s = math.sqrt(max(p * (1 - p), 0.0) / n)
            return p + s, d._p_min + d.drift_threshold * d._s_min, self._win_n
        key = {"eddm": "beta", "hddm_a": "drift_confidence", "hddm_w": "drift_confidence", "kswin": "alpha"}[self.kind]
        return mean, float(getattr(d, key)), self._win_n

    def update(self, x: float, ts: int | None = None, model_version: str | None = None) -> Detection | None:
        """Feed one value; returns a Detection when the detector fires (after warm-up)."""
        x = float(x)
        if not math.isfinite(x):
            return None
        self._det.update(x)
        if self._tail is not None:
            self._tail.append(x)
        self.n += 1
        self._win_n += 1
        self._win_sum += x
        if self._ts_start is None:
            self._ts_start = ts
        self._ts_last = ts
        drift_now = bool(self._det.drift_detected)
        warn_now = bool(getattr(self._det, "warning_detected", False)) and not drift_now
        level: Level | None = "drift" if drift_now else ("warning" if warn_now and not self._warning else None)
        self._warning = warn_now
        out = None
        if level is not None and self.n > self.warmup:
            stat, thr, window = self._stat()
            out = Detection(
                self.name, self.metric, level, stat, thr, window, self._ts_start, ts, self.n, self.family, model_version
            )
            if level == "drift":
                self.n_detections += 1
        if drift_now:  # River resets its detector after a drift: start a new evidence window too
            self._win_n, self._win_sum, self._ts_start, self._warning = 0, 0.0, None, False
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "type": "DetectorMonitor",
            "kind": self.kind,
            "metric": self.metric,
            "name": self.name,
            "n": self.n,
            "n_detections": self.n_detections,
            "win_n": self._win_n,
            "win_sum": self._win_sum,
            "ts_start": self._ts_start,
            "ts_last": self._ts_last,
            "warning": self._warning,
        }
        if self._tail is None:
            state["detector"] = {k: _encode(v) for k, v in vars(self._det).items() if not callable(v)}
        else:
            state["tail"] = list(self._tail)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state.get("kind"), state.get("metric")) != (self.kind, self.metric):
            raise MonitorError(f"{self.name}: checkpoint is for {state.get('kind')}:{state.get('metric')}")
        self.reset()
        if "detector" in state:
            for k, v in state["detector"].items():
                setattr(self._det, k, _decode(v))
        else:
            if self._tail is None:
                raise MonitorError(f"{self.name}: checkpoint replays a tail, but {self.kind} restores its exact state")
            for x in state["tail"]:  # rebuild opaque (compiled) detectors by replay
                self._det.update(float(x))
                self._tail.append(float(x))
        self.n, self.n_detections = int(state["n"]), int(state["n_detections"])
        self._win_n, self._win_sum = int(state["win_n"]), float(state["win_sum"])
        self._ts_start, self._ts_last, self._warning = state["ts_start"], state["ts_last"], bool(state["warning"])


# --------------------------------------------------------------------------- distribution tests


class _DistributionMonitor:
    """Shared reference-window bookkeeping of PSI and KS."""

    family = "distribution"
    kind = ""

    def __init__(
        self,
        metric: str = PREDICTION,
        *,
        mode: Literal["window", "decay"] = "window",
        bins: int = 10,
        reference_size: int = 5000,
        window_size: int = 5000,
        half_life: int = 2000,
        check_every: int = 500,
        warning: float | None = None,
        threshold: float | None = None,
        warmup: int = 0,
        rebase_on_drift: bool = True,
        name: str | None = None,
    ) -> None:
        if mode not in ("window", "decay"):
            raise MonitorError(f"mode must be 'window' or 'decay', got {mode!r}")
        for k, v in (
            ("bins", bins),
            ("reference_size", reference_size),
            ("window_size", window_size),
            ("half_life", half_life),
            ("check_every", check_every),
        ):
            if v < 1:
                raise MonitorError(f"{k} must be >= 1, got {v}")
        self.metric, self.mode, self.bins = metric, mode, bins
        self.reference_size, self.window_size = reference_size, window_size
        self.half_life, self.check_every = half_life, check_every
        self.warning = self.default_warning if warning is None else warning
        self.threshold = self.default_threshold if threshold is None else threshold
        self.warmup, self.rebase_on_drift = warmup, rebase_on_drift
        self.name = name or f"{self.kind}:{metric}" + (":decay" if mode == "decay" else "")
        self.decay = 0.5 ** (1.0 / half_life)
        self.reset()

    default_warning = 0.0
    default_threshold = 0.0

    def reset(self) -> None:
        self.n = 0
        self.n_detections = 0
        self.rebase()

    def rebase(self) -> None:
        """Start collecting a new reference window from the next value."""
        self._ref: list[float] = []
        self.edges: list[float] | None = None  # inner bin edges from reference quantiles
        self.ref_frac: list[float] | None = None
        self._cur: list[float] = []  # window mode: values of the current window
        self._counts: list[float] = []  # decay mode: decayed bin counts
        self._w, self._w2 = 0.0, 0.0  # decay mode: sum of weights and of squared weights
        self._g = 1.0  # decay mode: weight of the latest value
        self._since_check = 0
        self._ts_start: int | None = None
        self._level: Level | None = None

    def _reference(self) -> tuple[list[float], list[float]]:
        """The fixed reference: (inner bin edges, fraction of the reference in each bin)."""
        if self.edges is None or self.ref_frac is None:
            raise MonitorError(f"{self.name}: no reference window yet")
        return self.edges, self.ref_frac

    def _bin(self, x: float) -> int:
        return bisect.bisect_right(self._reference()[0], x)

    def _fix_reference(self) -> None:
        ref = np.asarray(self._ref)
        qs = np.quantile(ref, np.linspace(0, 1, self.bins + 1)[1:-1])
        edges: list[float] = np.unique(qs).tolist()
        counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1)
        self.edges, self.ref_frac = edges, (counts / counts.sum()).tolist()
        self._counts = [0.0] * (len(edges) + 1)

    def update(self, x: float, ts: int | None = None, model_version: str | None = None) -> Detection | None:
        x = float(x)
        if not math.isfinite(x):
            return None
        self.n += 1
        if self.n <= self.warmup:
            return None
        if self.edges is None:
            self._ref.append(x)
            if len(self._ref) >= self.reference_size:
                self._fix_reference()
            return None
        if self._ts_start is None:
            self._ts_start = ts
        if self.mode == "window":
            self._cur.append(x)
            if len(self._cur) < self.window_size:
                return None
            stat, window = self._score_window(np.asarray(self._cur)), len(self._cur)
            ts_start, self._ts_start, self._cur = self._ts_start, None, []
        else:
            # O(1) exponential decay: weigh the new value by g = decay**-t instead of shrinking every
            # count; only ratios are ever read, and a rescale keeps the numbers finite
            self._g /= self.decay
            if self._g > 1e100:
                self._counts = [c / self._g for c in self._counts]
                self._w, self._w2, self._g = self._w / self._g, self._w2 / self._g**2, 1.0
            self._counts[self._bin(x)] += self._g
            self._w += self._g
            self._w2 += self._g * self._g
            self._since_check += 1
            if (
                self._since_check < self.check_every
                or self._w / self._g < min(self.half_life, self.reference_size) * 0.5
            ):
                return None
            self._since_check = 0
            stat, window, ts_start = self._score_counts(), int(round(self._w * self._w / self._w2)), self._ts_start
        return self._decide(stat, window, ts_start, ts, model_version)

    def _decide(
        self, stat: float, window: int, ts_start: int | None, ts: int | None, model_version: str | None
    ) -> Detection | None:
        thr_drift, thr_warn = self._thresholds(window)
        level: Level | None = "drift" if stat >= thr_drift else ("warning" if stat >= thr_warn else None)
        prev, self._level = self._level, level
        if level is None or (level == "warning" and prev == "warning"):
            return None
        det = Detection(
            self.name,
            self.metric,
            level,
            float(stat),
            float(thr_drift),
            window,
            ts_start,
            ts,
            self.n,
            self.family,
            model_version,
        )
        if level == "drift":
            self.n_detections += 1
            if self.rebase_on_drift:
                self.rebase()
        return det

    def state_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "metric": self.metric,
            "name": self.name,
            "n": self.n,
            "n_detections": self.n_detections,
            "ref": self._ref,
            "edges": self.edges,
            "ref_frac": self.ref_frac,
            "cur": self._cur,
            "counts": self._counts,
            "w": self._w,
            "w2": self._w2,
            "g": self._g,
            "since_check": self._since_check,
            "ts_start": self._ts_start,
            "level": self._level,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state.get("type"), state.get("metric")) != (type(self).__name__, self.metric):
            raise MonitorError(f"{self.name}: checkpoint is for {state.get('type')}:{state.get('metric')}")
        self.n, self.n_detections = int(state["n"]), int(state["n_detections"])
        self._ref, self.edges, self.ref_frac = list(state["ref"]), state["edges"], state["ref_frac"]
        self._cur, self._counts = list(state["cur"]), list(state["counts"])
        self._w, self._w2, self._since_check = float(state["w"]), float(state["w2"]), int(state["since_check"])
        self._g = float(state["g"])
        self._ts_start, self._level = state["ts_start"], state["level"]

    # subclasses
    def _score_window(self, values: np.ndarray) -> float:
        raise NotImplementedError

    def _score_counts(self) -> float:
        raise NotImplementedError

    def _thresholds(self, n: int) -> tuple[float, float]:
        return self.threshold, self.warning


class PSIMonitor(_DistributionMonitor):
    """Population Stability Index against a reference window (quantile bins of the reference).

    ``PSI = sum((cur - ref) * ln(cur / ref))``; the usual reading: < 0.1 stable,
    0.1-0.25 warning, > 0.25 drift (the defaults).

    >>> m = PSIMonitor("x", reference_size=500, window_size=500)
    >>> rng = np.random.default_rng(0)
    >>> [m.update(v) for v in rng.normal(0, 1, 1000)][-1] is None
    True
    >>> d = [m.update(v) for v in rng.normal(1.5, 1, 500)][-1]
    >>> d.level, d.detector, d.statistic > 0.25
    ('drift', 'psi:x', True)
    """

    kind = "psi"
    default_warning = 0.1
    default_threshold = 0.25

    @staticmethod
    def psi(ref: np.ndarray, cur: np.ndarray) -> float:
        ref = np.clip(ref, 1e-4, None)
        cur = np.clip(cur, 1e-4, None)
        return float(np.sum((cur - ref) * np.log(cur / ref)))

    def _score_window(self, values: np.ndarray) -> float:
        edges, ref_frac = self._reference()
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        return self.psi(np.asarray(ref_frac), counts / counts.sum())

    def _score_counts(self) -> float:
        c = np.asarray(self._counts)
        return self.psi(np.asarray(self._reference()[1]), c / c.sum())


class KSMonitor(_DistributionMonitor):
    """Two-sample Kolmogorov-Smirnov test against a reference window.

    ``window`` mode: exact D between the reference sample and each window;
    ``decay`` mode: D between binned CDFs (``bins`` quantile bins, 50 is a good
    choice) with the effective sample size of the decayed counts. Drift when
    D exceeds the critical value at ``threshold`` (a significance level,
    default 0.001); warning at ``warning`` (default 0.01).

    >>> m = KSMonitor("x", reference_size=500, window_size=500)
    >>> rng = np.random.default_rng(0)
    >>> [m.update(v) for v in rng.normal(0, 1, 1000)][-1] is None
    True
    >>> d = [m.update(v) for v in rng.normal(0.5, 1, 500)][-1]
    >>> d.level, d.statistic > d.threshold
    ('drift', True)
    """

    kind = "ks"
    default_warning = 0.01
    default_threshold = 0.001

    def _fix_reference(self) -> None:
        super()._fix_reference()
        self._ref = sorted(self._ref)

    @staticmethod
    def critical(alpha: float, n: int, m: int) -> float:
        """The KS critical value of D at significance ``alpha`` for sample sizes n and m."""
        return math.sqrt(-math.log(alpha / 2.0) / 2.0) * math.sqrt((n + m) / (n * m))

    def _thresholds(self, n: int) -> tuple[float, float]:
        nr = len(self._ref) if self._ref else self.reference_size
        return self.critical(self.threshold, nr, n), self.critical(self.warning, nr, n)

    def _score_window(self, values: np.ndarray) -> float:
        ref = np.asarray(self._ref)
        cur = np.sort(values)
        grid = np.concatenate([ref, cur])
        cdf_r = np.searchsorted(ref, grid, side="right") / len(ref)
        cdf_c = np.searchsorted(cur, grid, side="right") / len(cur)
        return float(np.max(np.abs(cdf_r - cdf_c)))

    def _score_counts(self) -> float:
        c = np.asarray(self._counts)
        return float(np.max(np.abs(np.cumsum(self._reference()[1]) - np.cumsum(c / c.sum()))))


# --------------------------------------------------------------------------- factory + suite


def make_monitor(
    kind: str, metric: str, params: Mapping[str, Any] | None = None, warmup: int = 1000, name: str | None = None
) -> DetectorMonitor | PSIMonitor | KSMonitor:
    """Build a monitor from a config entry (``kind``, ``metric``, ``params``, ``warmup``)."""
    params = dict(params or {})
    if kind in DETECTORS:
        tail = int(params.pop("tail", 5000))
        return DetectorMonitor(kind, metric, params, warmup=warmup, name=name, tail=tail)
    classes: dict[str, type[PSIMonitor] | type[KSMonitor]] = {"psi": PSIMonitor, "ks": KSMonitor}
    cls = classes.get(kind)
    if cls is None:
        raise MonitorError(f"unknown monitor kind {kind!r}; allowed: {', '.join(MONITOR_KINDS)}")
    try:
        return cls(metric, warmup=warmup, name=name, **params)
    except TypeError as e:
        raise MonitorError(f"{kind}:{metric}: bad params {params}: {e}") from None


class MonitorSuite:
    """Every monitor of a deployment, fed from (prediction, label, features) records.

    >>> suite = MonitorSuite.from_specs([{"kind": "adwin", "metric": "click", "warmup": 0}])
    >>> suite.update(0.3, 1, ts=1)
    []
    >>> sorted(suite.state_dict()["monitors"])
    ['adwin:click']
    """

    def __init__(self, monitors: Iterable[DetectorMonitor | _DistributionMonitor]) -> None:
        self.monitors = list(monitors)
        names = [m.name for m in self.monitors]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MonitorError(f"monitor names must be unique; repeated: {', '.join(dup)} (set 'name')")
        self.n = 0
        self.missing: dict[str, int] = {}

    @classmethod
    def from_specs(cls, specs: Iterable[Mapping[str, Any]], default_warmup: int = 1000) -> MonitorSuite:
        return cls(
            make_monitor(
                s["kind"], s.get("metric", "logloss"), s.get("params"), s.get("warmup", default_warmup), s.get("name")
            )
            for s in specs
        )

    def update(
        self,
        p: float,
        label: int,
        features: Mapping[str, Any] | None = None,
        ts: int | None = None,
        model_version: str | None = None,
    ) -> list[Detection]:
        """Feed one labelled prediction to every monitor; returns the detections it caused."""
        self.n += 1
        signals = event_signals(p, label)
        out: list[Detection] = []
        for m in self.monitors:
            x = signals.get(m.metric)
            if x is None:
                x = (features or {}).get(m.metric)
                if not isinstance(x, (int, float)) or isinstance(x, bool):
                    self.missing[m.metric] = self.missing.get(m.metric, 0) + 1
                    continue
            det = m.update(x, ts, model_version)
            if det is not None:
                out.append(det)
        return out

    def update_batch(
        self,
        p: np.ndarray,
        labels: np.ndarray,
        features: Mapping[str, np.ndarray] | None = None,
        ts: np.ndarray | None = None,
        model_version: str | None = None,
    ) -> list[tuple[int, Detection]]:
        """Feed a batch of labelled predictions (arrays, stream order) to every monitor.

        Returns ``(row, detection)`` pairs in row order (monitor order within a row): what calling
        :meth:`update` row by row would return, and the monitors end in the same state. The signals are
        computed on arrays, each monitor then takes its column as plain floats: no record or dict per event.
        ``features`` maps a metric name to a column (B,); a column that is not numeric counts as missing.
        """
        p = np.asarray(p, dtype=np.float64)
        n = len(p)
        if len(labels) != n or (ts is not None and len(ts) != n):
            raise MonitorError(
                f"p, labels and ts must have the same length, got {n}, {len(labels)}, {None if ts is None else len(ts)}"
            )
        self.n += n
        if n == 0:
            return []
        signals = batch_signals(p, labels)
        ts_list = [None] * n if ts is None else np.asarray(ts).tolist()
        hits: list[tuple[int, int, Detection]] = []
        for order, m in enumerate(self.monitors):
            col = signals.get(m.metric)
            if col is None:
                col = (features or {}).get(m.metric)
                arr = None if col is None else np.asarray(col)
                if arr is None or arr.dtype.kind not in "iuf" or len(arr) != n:
                    self.missing[m.metric] = self.missing.get(m.metric, 0) + n
                    continue
                col = arr
            update = m.update
            for i, (x, t) in enumerate(zip(col.tolist(), ts_list)):
                det = update(x, t, model_version)
                if det is not None:
                    hits.append((i, order, det))
        hits.sort(key=lambda h: (h[0], h[1]))
        return [(i, det) for i, _, det in hits]

    def rebase(self) -> None:
        """A new model is serving: forget performance history and take a new reference window."""
        for m in self.monitors:
            m.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "missing": dict(self.missing), "monitors": {m.name: m.state_dict() for m in self.monitors}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n, self.missing = int(state["n"]), dict(state.get("missing", {}))
        for m in self.monitors:
            if m.name in state["monitors"]:
                m.load_state_dict(state["monitors"][m.name])
