"""River online baselines behind the same batch interface as the torch learners.

Both read the same batch dict as the torch models (hashed ids in ``cat``,
standardised ``num``, multi-valued ``bag`` fields such as genres), turned into
River's sparse dicts: one indicator per hashed id (``"c<bucket>": 1``; a bag's
values share its weight, ``1 / len`` each, as the models' mean-pooled bag does)
plus the numeric values. So the baselines see
exactly the features the neural models see, and differ only in the learner.

- ``river_lr``: :class:`river.linear_model.LogisticRegression` (SGD)
- ``river_fm``: :class:`river.facto.FMClassifier` (factorisation machine)

``numeric`` selects columns of ``num`` (default: all). River's FM computes
every pairwise interaction in pure Python (about 200 samples/s with 28
features here), so the evaluation gives its FM the ids plus the smoothed
click rates only.

>>> import torch
>>> b = {"cat": torch.tensor([[1, 5], [2, 6]]), "num": torch.tensor([[0.5], [-0.5]]),
...      "label": torch.tensor([1.0, 0.0])}
>>> m = RiverBaseline("lr", lr=0.1, seed=0)
>>> m.test_then_train(b)[0].item()   # scored before any update
0.5
>>> p = m.predict_proba(b); bool(p[0] > p[1])
True
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from river import facto, linear_model, optim
from river.base import Classifier

KINDS = ("lr", "fm")


class RiverBaseline:
    """A River classifier (``kind`` = "lr" or "fm") with ``predict_proba``/``learn`` on batch dicts."""

    def __init__(
        self,
        kind: str = "lr",
        lr: float = 0.05,
        l2: float = 0.0,
        n_factors: int = 8,
        seed: int = 0,
        numeric: tuple[int, ...] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.kind, self.lr, self.l2, self.n_factors, self.seed = kind, lr, l2, n_factors, seed
        self.numeric = tuple(numeric) if numeric is not None else None  # columns of ``num`` to use (None = all)
        self.reset()

    def reset(self) -> None:
        self.model: Classifier
        if self.kind == "lr":
            self.model = linear_model.LogisticRegression(optimizer=optim.SGD(self.lr), l2=self.l2, intercept_lr=self.lr)
        else:
            self.model = facto.FMClassifier(
                n_factors=self.n_factors,
                weight_optimizer=optim.SGD(self.lr),
                latent_optimizer=optim.SGD(self.lr),
                l2_weight=self.l2,
                l2_latent=self.l2,
                intercept_lr=self.lr,
                seed=self.seed,
            )

    def clone(self) -> RiverBaseline:
        """An untrained twin with the same configuration."""
        return RiverBaseline(self.kind, self.lr, self.l2, self.n_factors, self.seed, self.numeric)

    def to_dicts(self, batch: dict[str, torch.Tensor]) -> list[dict[Hashable, float]]:
        """River feature dicts of a batch (one per row; River names features by any hashable)."""
        cat = batch["cat"].tolist()
        num = None
        if "num" in batch:
            num_t = batch["num"] if self.numeric is None else batch["num"][:, list(self.numeric)]
            num = num_t.tolist()
        bags = batch["bag"].tolist() if "bag" in batch else None
        rows = []
        for i, ids in enumerate(cat):
            x: dict[Hashable, float] = {f"c{b}": 1.0 for b in ids}
            if bags is not None:
                for bag in bags[i]:
                    vals = [b for b in bag if b > 0]  # 0 pads
                    x.update({f"c{b}": 1.0 / len(vals) for b in vals})
            if num is not None:
                x.update({f"n{j}": v for j, v in enumerate(num[i])})
            rows.append(x)
        return rows

    def predict_proba(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        xs = self.to_dicts(batch)
        return torch.tensor([self.model.predict_proba_one(x).get(True, 0.0) for x in xs], dtype=torch.float32)

    def learn(self, batch: dict[str, torch.Tensor]) -> None:
        for x, y in zip(self.to_dicts(batch), batch["label"].tolist()):
            self.model.learn_one(x, bool(y >= 0.5))

    def test_then_train(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per sample: predict, then learn (River is naturally one-at-a-time); returns pre-update probabilities."""
        out = np.empty(len(batch["cat"]), dtype=np.float32)
        for i, (x, y) in enumerate(zip(self.to_dicts(batch), batch["label"].tolist())):
            out[i] = self.model.predict_proba_one(x).get(True, 0.0)
            self.model.learn_one(x, bool(y >= 0.5))
        return torch.from_numpy(out)

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "l2": self.l2,
            "n_factors": self.n_factors,
            "seed": self.seed,
            "numeric": list(self.numeric) if self.numeric is not None else None,
        }
