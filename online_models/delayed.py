"""Learning under delayed feedback: fake-negative corrections (pure torch / NumPy).

When labels arrive late, a trainer can wait for each example's attribution
window to close (every label final, but the model learns an hour late), or
learn every impression at once as a negative and add a positive copy when its
click arrives (fresh, but the early negatives are *fake negatives* for the
impressions that will click). Ktena et al. (RecSys 2019, "Addressing delayed
feedback for continuous training with neural networks in CTR prediction")
correct the second stream:

- **FNW** (fake negative weighted): importance weights on the biased stream,
  with ``f`` the model's own probability (no gradient through it)::

      loss = -sum_pos (1 + f) log f  -  sum_neg (1 - f)(1 + f) log(1 - f)

- **FNC** (fake negative calibration): learn the biased probability ``b`` with
  the plain log loss, serve ``p = b / (1 - b)`` (clipped to [eps, 1 - eps]).

Both assume every positive arrives eventually as a duplicate of its negative,
so the biased distribution is ``b = p / (1 + p)``. The stream the join writes
(:mod:`pipelines.join`) is the "wait for the window" alternative: one example
per impression, labelled when known.

>>> import torch
>>> fnw_weights(torch.tensor([0.2, 0.2]), torch.tensor([1.0, 0.0])).tolist()
[1.2000000476837158, 0.9600000381469727]
>>> round(float(fnc_calibrate(torch.tensor([1 / 3]))[0]), 6)
0.5
"""

from __future__ import annotations

import torch

from online_models.learner import OnlineLearner

CORRECTIONS = ("fnw", "fnc")


def fnw_weights(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample FNW weights: ``1 + p`` for positives, ``(1 - p)(1 + p)`` for negatives (``p`` detached)."""
    p = p.detach().float()
    return torch.where(y > 0.5, 1.0 + p, (1.0 - p) * (1.0 + p))


def fnc_calibrate(b: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """FNC: the biased probability ``b`` (learnt with fake negatives) -> ``p = b / (1 - b)``, clipped."""
    b = b.float().clamp(0.0, 1.0 - eps)
    return (b / (1.0 - b)).clamp(eps, 1.0 - eps)


def learn_weighted(
    learner: OnlineLearner,
    batch: dict[str, torch.Tensor],
    weights: torch.Tensor | None = None,
    correction: str | None = None,
) -> float:
    """One optimizer step of ``learner`` on ``batch`` with per-sample ``weights`` (or the FNW weights from
    the model's own current prediction when ``correction == 'fnw'``); otherwise exactly
    :meth:`OnlineLearner.learn` (the same step: sparse id rows, regularisation, clipping, dropout seed)."""
    if "label" not in batch:
        raise KeyError("learn_weighted() needs a batch with a 'label' tensor")
    if correction not in (None, "fnc", "fnw"):
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)} or None, got {correction!r}")
    if correction == "fnw":
        return learner.learn(batch, weight_fn=lambda logits, y: fnw_weights(torch.sigmoid(logits), y))
    if weights is not None:
        return learner.learn(batch, weight_fn=lambda logits, y: weights)
    return learner.learn(batch)
