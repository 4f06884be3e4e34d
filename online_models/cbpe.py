"""A label-free performance estimate while labels are pending (in the spirit of NannyML's CBPE).

Confidence-based performance estimation: if a model's probabilities are
calibrated, each pending impression clicks with probability ``p_i``, so the
*expected* metric over impressions whose labels have not arrived can be
computed from the probabilities alone:

- expected logloss = mean binary entropy ``-p log p - (1-p) log(1-p)``;
- expected AUC = ``sum_{i != j} p_i (1 - p_j) [s_i > s_j] / sum_{i != j} p_i (1 - p_j)``
  (ties count one half), the probability that a random positive outranks a
  random negative when labels are drawn from the ``p_i``; O(n log n).

Calibration is learnt on labelled history (:class:`PlattCalibrator`, two
parameters fitted by Newton's method), and the estimate is only as good as
that calibration: a shift in P(y | x) that the model does not see is
invisible to it (a covariate shift is not). :class:`CBPEMonitor` raises an
alarm when the estimate leaves the band (mean +/- ``k`` sigma) of the
estimates over reference chunks, so a shift can be suspected before its
labels exist.

>>> import numpy as np
>>> p = np.array([0.9, 0.8, 0.2, 0.1])
>>> round(expected_auc(p, p), 4), round(expected_logloss(p), 4)
(0.9286, 0.4127)
>>> expected_auc(np.array([0.5, 0.5]), np.array([1.0, 1.0]))
0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from online_models.metrics import auc, logloss

EPS = 1e-7


def expected_logloss(p: np.ndarray) -> float:
    """Mean logloss if labels are drawn from the (calibrated) probabilities ``p``."""
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p)))) if len(p) else float("nan")


def expected_auc(p: np.ndarray, scores: np.ndarray | None = None) -> float:
    """Expected AUC of ``scores`` (default ``p``) when each label is Bernoulli(``p_i``); NaN if undefined."""
    p = np.asarray(p, float)
    s = p if scores is None else np.asarray(scores, float)
    if len(p) < 2:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s, p = s[order], p[order]
    neg = 1.0 - p
    # groups of equal scores: a positive outranks the negatives of strictly lower groups, ties count 1/2
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    g_neg = np.add.reduceat(neg, starts)
    g_pos = np.add.reduceat(p, starts)
    below = np.cumsum(g_neg) - g_neg
    num = float(np.sum(g_pos * below) + 0.5 * (np.sum(g_pos * g_neg) - np.sum(p * neg)))
    den = float(p.sum() * neg.sum() - np.sum(p * neg))
    return num / den if den > 0 else float("nan")


@dataclass
class PlattCalibrator:
    """``p_cal = sigmoid(a * logit(p) + b)``, fitted on labelled history (identity until fitted)."""

    a: float = 1.0
    b: float = 0.0

    def fit(self, p: np.ndarray, y: np.ndarray, iters: int = 50, l2: float = 1e-3) -> PlattCalibrator:
        """Newton's method with backtracking, from the constant model (a = 0, b = logit of the mean label),
        where the Hessian is well conditioned even for a very overconfident model."""
        z = _logit(np.asarray(p, float))
        y = np.asarray(y, float)
        if len(z) < 10 or y.min() == y.max():
            return self
        X = np.stack([z, np.ones_like(z)], 1)

        def loss(w: np.ndarray) -> float:
            t = X @ w
            return float(np.sum(np.logaddexp(0, t) - y * t) + 0.5 * l2 * w @ w)

        w = np.array([0.0, float(_logit(np.array([y.mean()]))[0])])
        cur = loss(w)
        for _ in range(iters):
            q = 1 / (1 + np.exp(-(X @ w)))
            grad = X.T @ (q - y) + l2 * w
            hess = (X * (q * (1 - q))[:, None]).T @ X + l2 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            t = 1.0
            while t > 1e-6 and loss(w - t * step) > cur:
                t /= 2
            w, prev, cur = w - t * step, cur, loss(w - t * step)
            if abs(prev - cur) < 1e-10 * max(1.0, abs(cur)):
                break
        self.a, self.b = float(w[0]), float(w[1])
        return self

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(self.a * _logit(np.asarray(p, float)) + self.b)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


@dataclass
class CBPEMonitor:
    """Alarm when the label-free expected AUC of a chunk falls below ``mean - k * sigma`` of the reference
    chunks' estimates (NannyML's band, k = 3). ``update`` returns True on an alarm.

    ``two_sided`` also alarms above the band (NannyML's default). Off by default: a model that keeps
    learning raises its expected AUC past a band fitted on its first chunks, and that is no page (on
    ML-100K under delay, 23 of 46 chunks left the band upwards).
    """

    k: float = 3.0
    two_sided: bool = False
    min_reference: int = 3
    reference: list[float] = field(default_factory=list)
    alarms: list[int] = field(default_factory=list)
    _n: int = 0

    def fit(self, estimates: list[float]) -> CBPEMonitor:
        self.reference = [float(e) for e in estimates if np.isfinite(e)]
        return self

    @property
    def band(self) -> tuple[float, float] | None:
        if len(self.reference) < self.min_reference:
            return None
        m, sd = float(np.mean(self.reference)), float(np.std(self.reference, ddof=1))
        return m - self.k * sd, m + self.k * sd

    def update(self, estimate: float) -> bool:
        self._n += 1
        band = self.band
        alarm = (
            band is not None
            and np.isfinite(estimate)
            and (estimate < band[0] or (self.two_sided and estimate > band[1]))
        )
        if alarm:
            self.alarms.append(self._n - 1)
        return bool(alarm)


def estimate_over_time(
    p: np.ndarray,
    ts: np.ndarray,
    label: np.ndarray,
    label_ts: np.ndarray,
    *,
    start: int = 0,
    chunk: int = 2000,
    calibration_window: int = 5000,
    reference_chunks: int = 5,
    min_pending: int = 50,
) -> dict:
    """The label-free estimate against the realised metric, chunk by chunk of a served stream.

    ``p``: the served predictions at impression time, ``ts`` impression times (sorted), ``label`` the
    outcomes and ``label_ts`` when each became known. For each chunk of ``chunk`` impressions from
    ``start``: a Platt calibrator fitted on the latest ``calibration_window`` outcomes known before the
    chunk's first impression (none of the chunk's own), the expected AUC / logloss of the chunk, and the
    realised ones once its labels are in; also over just the impressions still pending when the chunk's
    last one is served (when at least ``min_pending``). A :class:`CBPEMonitor` on the expected AUC, its band
    from the first ``reference_chunks`` chunks. Returns the rows, the mean absolute gaps and the alarms.
    This is what a report plots as "estimate vs realised over time".
    """
    p, ts, label, label_ts = (np.asarray(x) for x in (p, ts, label, label_ts))
    rows = []
    by_label_time = np.argsort(label_ts, kind="stable")
    sorted_lts = label_ts[by_label_time]
    for lo in range(start, len(ts) - chunk + 1, chunk):
        hi = lo + chunk
        known = by_label_time[: int(np.searchsorted(sorted_lts, ts[lo], side="left"))][-calibration_window:]
        cal = PlattCalibrator().fit(p[known], label[known])
        q = cal(p[lo:hi])
        open_ = label_ts[lo:hi] > ts[hi - 1]
        row = {
            "lo": lo,
            "hi": hi,
            "ts": int(ts[hi - 1]),
            "pending_share": float(open_.mean()),
            "expected_auc": expected_auc(q, p[lo:hi]),
            "realised_auc": auc(label[lo:hi], p[lo:hi]),
            "expected_logloss": expected_logloss(q),
            "realised_logloss": logloss(label[lo:hi], p[lo:hi]),
            "uncalibrated_expected_logloss": expected_logloss(p[lo:hi]),
        }
        if open_.sum() >= min_pending:
            row.update(
                pending_n=int(open_.sum()),
                pending_expected_logloss=expected_logloss(q[open_]),
                pending_realised_logloss=logloss(label[lo:hi][open_], p[lo:hi][open_]),
                pending_expected_auc=expected_auc(q[open_], p[lo:hi][open_]),
                pending_realised_auc=auc(label[lo:hi][open_], p[lo:hi][open_]),
            )
        rows.append(row)
    mon = CBPEMonitor().fit([r["expected_auc"] for r in rows[:reference_chunks]])
    alarms = [i for i, r in enumerate(rows[reference_chunks:], reference_chunks) if mon.update(r["expected_auc"])]

    def gap(rs: list[dict], e: str, r: str) -> float | None:
        vals = [abs(x[e] - x[r]) for x in rs if np.isfinite(x[e]) and np.isfinite(x[r])]
        return float(np.mean(vals)) if vals else None

    pend = [r for r in rows if "pending_n" in r]
    return {
        "chunks": rows,
        "mae_auc": gap(rows, "expected_auc", "realised_auc"),
        "mae_logloss": gap(rows, "expected_logloss", "realised_logloss"),
        "uncalibrated_mae_logloss": gap(rows, "uncalibrated_expected_logloss", "realised_logloss"),
        "pending_chunks": len(pend),
        "pending_mae_auc": gap(pend, "pending_expected_auc", "pending_realised_auc"),
        "pending_mae_logloss": gap(pend, "pending_expected_logloss", "pending_realised_logloss"),
        "monitor_alarms": alarms,
        "monitor_band": mon.band,
    }
