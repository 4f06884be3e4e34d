"""Online learning of a torch CTR model: test-then-train on mini-batches.

:class:`OnlineLearner` owns a model and its optimizer. ``test_then_train``
scores a batch with the current weights (eval mode, no gradient), then takes
one optimizer step on it, and returns the pre-update predictions: the
honest, prequential view that the evaluation and the Ray trainer share.
The River baselines (:mod:`online_models.river_baselines`) expose the same
``predict_proba`` / ``learn`` / ``test_then_train`` verbs.

>>> from online_models.models import ModelConfig, build_model
>>> torch.manual_seed(0) is not None
True
>>> model = build_model(ModelConfig(kind="lr", num_categorical=1, hash_buckets=4, seed=0))
>>> learner = OnlineLearner(model, LearnerConfig(lr=0.5, seed=0))
>>> batch = {"cat": torch.tensor([[1], [2]]), "label": torch.tensor([1.0, 0.0])}
>>> learner.test_then_train(batch).tolist()   # scored before the update
[0.5, 0.5]
>>> p = learner.predict_proba(batch); bool(p[0] > 0.5 > p[1])
True
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
from torch import nn

from online_models.models import CTRModel


@dataclass(frozen=True)
class LearnerConfig:
    """Optimizer settings of an :class:`OnlineLearner`."""

    lr: float = 1e-3
    weight_decay: float = 0.0      # decoupled (AdamW) decay on dense weights only; embeddings use embedding_l2
    optimizer: str = "adam"        # "adam" | "sgd" | "adagrad"
    grad_clip: float = 10.0
    # learning rate of the id embeddings and first-order id weights (None = lr). Each id appears in few
    # batches, so with Adam at the dense rate a new user's bias barely moves before the user is gone.
    embedding_lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd", "adagrad"):
            raise ValueError(f"optimizer must be one of adam, sgd, adagrad, got {self.optimizer!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OnlineLearner:
    """A model plus its optimizer; every step is test-then-train."""

    def __init__(self, model: CTRModel, config: LearnerConfig | None = None) -> None:
        self.model = model
        self.config = config or LearnerConfig()
        self.steps = 0
        self._gen = torch.Generator().manual_seed(self.config.seed)   # dropout masks, reproducible per seed
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        emb = [p for n, p in self.model.named_parameters() if n.startswith(("embedding.", "linear."))]
        dense = [p for n, p in self.model.named_parameters() if not n.startswith(("embedding.", "linear."))]
        groups = [{"params": emb, "weight_decay": 0.0, "lr": cfg.embedding_lr or cfg.lr},
                  {"params": dense, "weight_decay": cfg.weight_decay, "lr": cfg.lr}]
        if cfg.optimizer == "adam":
            return torch.optim.AdamW(groups, lr=cfg.lr)
        if cfg.optimizer == "adagrad":
            return torch.optim.Adagrad(groups, lr=cfg.lr)
        return torch.optim.SGD(groups, lr=cfg.lr)

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities (B,) and hidden keys (B, H) with the current weights, in eval mode."""
        was = self.model.training
        self.model.eval()
        try:
            logits, hidden = self.model(batch)
        finally:
            self.model.train(was)
        return torch.sigmoid(logits), hidden

    def predict_proba(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.predict(batch)[0]

    def learn(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on ``batch`` (needs ``label``); returns the training loss."""
        if "label" not in batch:
            raise KeyError("learn() needs a batch with a 'label' tensor")
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._gen)))
            logits, _ = self.model(batch)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float())
            total = loss + self.model.regularization()
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
        self.model._last_emb = None   # drop the graph reference (keeps the model deep-copyable)
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.steps += 1
        return float(loss.detach())

    def test_then_train(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Score ``batch`` with the current weights, then learn from it; returns the pre-update probabilities."""
        p = self.predict_proba(batch)
        self.learn(batch)
        return p

    def fit(self, batches: Iterable[dict[str, torch.Tensor]], epochs: int = 1) -> list[float]:
        """Plain mini-batch training (e.g. the warm-up of a base model); batches are re-iterated per epoch."""
        batches = list(batches)
        return [self.learn(b) for _ in range(epochs) for b in batches]

    def clone(self) -> "OnlineLearner":
        """An independent copy (weights, optimizer state, step count and RNG state)."""
        twin = copy.deepcopy(self)
        return twin

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


def iter_batches(batch: dict[str, torch.Tensor], size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Consecutive slices of a batch dict (stream order kept).

    >>> [b["x"].tolist() for b in iter_batches({"x": torch.arange(5)}, 2)]
    [[0, 1], [2, 3], [4]]
    """
    n = len(next(iter(batch.values())))
    for lo in range(0, n, size):
        yield {k: v[lo:lo + size] for k, v in batch.items()}
