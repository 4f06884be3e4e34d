"""The deployment gate's statistics: a paired test on per-event logloss differences.

Two models (a *candidate* and the *current* one) are compared on the same
events, none of which either had learned from when it predicted them. Per
event ``d_i = logloss(candidate) - logloss(current)``; the mean ``d`` is the
candidate's excess loss (negative: the candidate is better). Its uncertainty
is taken from a circular **block bootstrap** (blocks of consecutive events,
so the serial correlation of a stream, e.g. bursts of one user, does not make
the interval too narrow). The interval is two-sided at ``level`` (0.90 by
default), so each of its ends is a one-sided bound at 95 %.

The rule depends on what is asked (one rule, three uses):

==========  ===================================================================
refresh     a routine incremental checkpoint: promoted **unless there is evidence
            it is worse** (the interval lies wholly above 0)
retrain     a model trained after drift: promoted **only with evidence it is
            better** (the interval lies wholly below 0)
rollback    the previous model as the candidate against the newly promoted one:
            rolled back **only with evidence the previous one is better**
==========  ===================================================================

>>> import numpy as np
>>> y = np.array([0, 1] * 200, float)
>>> same = np.full(400, 0.5)
>>> paired_test(y, same, same, "refresh").promote, paired_test(y, same, same, "retrain").promote
(True, False)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from online_models.errors import ReloopError

KINDS = ("refresh", "retrain", "rollback")
RULES = {
    "refresh": "promote unless the {pct}% interval of the paired logloss difference lies above 0 (evidence worse)",
    "retrain": "promote only if the {pct}% interval of the paired logloss difference lies below 0 (evidence better)",
    "rollback": "roll back only if the {pct}% interval of (previous - current) logloss lies below 0 "
    "(evidence the previous model is better)",
}


class GateError(ReloopError, ValueError):
    """The gate cannot decide: unequal inputs, too few events, an unknown kind."""


@dataclass(frozen=True)
class GateDecision:
    """One decision, with everything needed to audit it."""

    kind: str
    promote: bool  # for a rollback: roll back
    n: int
    diff: float  # mean per-event logloss, candidate - current (negative: candidate better)
    lo: float
    hi: float
    level: float
    candidate_logloss: float
    current_logloss: float
    rule: str
    block: int
    resamples: int

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        verdict = {
            "refresh": ("promoted", "rejected"),
            "retrain": ("promoted", "rejected"),
            "rollback": ("rolled back", "kept"),
        }[self.kind][0 if self.promote else 1]
        return (
            f"{self.kind} {verdict}: n={self.n}, logloss {self.candidate_logloss:.4f} vs "
            f"{self.current_logloss:.4f}, diff {self.diff:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}] "
            f"({100 * self.level:.0f}% block bootstrap)"
        )


def event_logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, float), eps, 1 - eps)
    y = np.asarray(y, float)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def block_bootstrap_mean(d: np.ndarray, level: float, block: int, resamples: int, seed: int) -> tuple[float, float]:
    """Two-sided ``level`` percentile interval of the mean of ``d`` (circular block bootstrap)."""
    n = len(d)
    block = max(1, min(block, n))
    k = -(-n // block)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(resamples, k))
    idx = (starts[:, :, None] + np.arange(block)).reshape(resamples, -1)[:, :n] % n
    means = d[idx].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def paired_test(
    y: np.ndarray,
    p_candidate: np.ndarray,
    p_current: np.ndarray,
    kind: str,
    *,
    level: float = 0.90,
    block: int = 25,
    resamples: int = 2000,
    min_n: int = 100,
    seed: int = 0,
    margin: float = 0.0,
) -> GateDecision:
    """Decide ``kind`` (see the module docstring) from paired predictions of the same labelled events.

    ``margin`` (a fraction of the current model's logloss) is a minimum effect size for ``retrain`` and
    ``rollback``: the interval must lie below ``-margin * current logloss``, not just below 0."""
    if kind not in KINDS:
        raise GateError(f"gate kind must be one of {', '.join(KINDS)}, got {kind!r}")
    y, pc, pr = (np.asarray(a, float) for a in (y, p_candidate, p_current))
    if not (len(y) == len(pc) == len(pr)):
        raise GateError(f"paired predictions of unequal length: {len(y)}, {len(pc)}, {len(pr)}")
    if len(y) < min_n:
        raise GateError(f"only {len(y)} paired events: the gate needs at least {min_n}")
    if not 0 < level < 1:
        raise GateError(f"level must be in (0, 1), got {level}")
    lc, lr = event_logloss(y, pc), event_logloss(y, pr)
    d = lc - lr
    lo, hi = block_bootstrap_mean(d, level, block, resamples, seed)
    diff = float(d.mean())
    # identical predictions: the interval is exactly [0, 0], no evidence either way
    promote = not lo > 0 if kind == "refresh" else hi < -margin * float(lr.mean())
    return GateDecision(
        kind,
        bool(promote),
        len(y),
        diff,
        lo,
        hi,
        level,
        float(lc.mean()),
        float(lr.mean()),
        RULES[kind].format(pct=round(100 * level)),
        block,
        resamples,
    )
