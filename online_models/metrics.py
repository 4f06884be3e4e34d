"""Streaming CTR metrics: AUC, gAUC and logloss, per slot and overall.

``auc`` is the exact Mann-Whitney statistic (ties count one half). ``gauc``
is the per-user AUC averaged over users who have both classes, weighted by
their impressions (the usual gAUC of CTR papers). ``logloss`` clips
probabilities to ``[eps, 1-eps]``.

:class:`SlotMetrics` accumulates a stream of scored batches cut into slots;
it keeps the scores of the current slot and of the whole run (the
evaluation needs exact AUCs, and a test stream of N events costs 24 N bytes).
For unbounded streams, :class:`BinnedAUC` keeps a fixed-size histogram.

>>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
0.75
>>> gauc([0, 1, 0, 1, 1], [0.1, 0.9, 0.8, 0.2, 0.5], ["a", "a", "b", "b", "c"])  # c has one class: skipped
0.5
>>> m = SlotMetrics()
>>> m.update([0, 1], [0.2, 0.7], ["u", "u"]); _ = m.end_slot()
>>> r = m.result(); r["auc"], r["n"], len(r["slots"])
(1.0, 2, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

EPS = 1e-7


def auc(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (NaN when only one class is present)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # ranks 1..n, ties share their average rank
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(xs)]])
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def gauc(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray, groups: Sequence[Any] | np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups with both classes (NaN if none)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(g, kind="stable")
    g_sorted = g[order]
    cuts = np.flatnonzero(np.diff(g_sorted)) + 1
    total, weight = 0.0, 0.0
    for idx in np.split(order, cuts):
        yy = y[idx]
        s = yy.sum()
        if 0 < s < len(yy):
            total += len(yy) * auc(yy, p[idx])
            weight += len(yy)
    return total / weight if weight else float("nan")


def logloss(y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray, eps: float = EPS) -> float:
    """Mean binary cross-entropy with probabilities clipped to [eps, 1-eps].

    >>> round(logloss([1, 0], [0.5, 0.5]), 4)
    0.6931
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def summarize(y: np.ndarray, p: np.ndarray, groups: np.ndarray) -> dict[str, float | None]:
    """``auc``, ``gauc``, ``logloss``, ``n`` and the observed/predicted click rates of one set of scores."""
    return {
        "auc": _clean(auc(y, p)),
        "gauc": _clean(gauc(y, p, groups)),
        "logloss": _clean(logloss(y, p)),
        "n": int(len(y)),
        "ctr": _clean(float(np.mean(y))) if len(y) else None,
        "mean_p": _clean(float(np.mean(p))) if len(p) else None,
    }


def _clean(x: float) -> float | None:
    """JSON has no NaN: undefined metrics become null."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


class SlotMetrics:
    """Scores of a test-then-train stream, cut into slots by :meth:`end_slot`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._cur: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._all: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.slots: list[dict[str, float | None]] = []

    def update(self, y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray, groups: Sequence[Any]) -> None:
        ys, ps, gs = np.asarray(y, np.float64), np.asarray(p, np.float64), np.asarray(groups)
        if not (len(ys) == len(ps) == len(gs)):
            raise ValueError(f"y, p and groups must have the same length, got {len(ys)}, {len(ps)}, {len(gs)}")
        if len(ys) and (np.isnan(ps).any() or ps.min() < 0 or ps.max() > 1):
            raise ValueError("predictions must be probabilities in [0, 1] (got NaN or out of range)")
        self._cur.append((ys, ps, gs))

    def end_slot(self) -> dict[str, float | None]:
        """Close the current slot and return its metrics."""
        y, p, g = _concat(self._cur)
        self._all.append((y, p, g))
        self._cur = []
        res = summarize(y, p, g)
        self.slots.append(res)
        return res

    def result(self) -> dict[str, Any]:
        """Overall metrics of all closed slots, plus the ``slots`` list."""
        y, p, g = _concat(self._all)
        return {**summarize(y, p, g), "slots": list(self.slots)}

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All closed-slot labels, predictions and groups, in stream order."""
        return _concat(self._all)


def _concat(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=object)
    ys, ps, gs = zip(*parts)
    return np.concatenate(ys), np.concatenate(ps), np.concatenate(gs)


class BinnedAUC:
    """Constant-memory streaming AUC over a histogram of ``bins`` score bins (exact up to ties within a bin).

    >>> a = BinnedAUC(bins=1000)
    >>> a.update([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    >>> round(a.value(), 2)
    0.75
    """

    def __init__(self, bins: int = 10_000) -> None:
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.bins = bins
        self.pos = np.zeros(bins, dtype=np.int64)
        self.neg = np.zeros(bins, dtype=np.int64)

    def update(self, y: Sequence[float] | np.ndarray, p: Sequence[float] | np.ndarray) -> None:
        ys = np.asarray(y, dtype=np.float64)
        b = np.clip((np.asarray(p, dtype=np.float64) * self.bins).astype(np.int64), 0, self.bins - 1)
        self.pos += np.bincount(b[ys == 1], minlength=self.bins)
        self.neg += np.bincount(b[ys == 0], minlength=self.bins)

    def value(self) -> float:
        n_pos, n_neg = self.pos.sum(), self.neg.sum()
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        neg_below = np.cumsum(self.neg) - self.neg  # negatives in strictly lower bins
        return float((self.pos * (neg_below + 0.5 * self.neg)).sum() / (n_pos * n_neg))
