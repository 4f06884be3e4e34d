"""Online learning of a torch CTR model: test-then-train on mini-batches.

:class:`OnlineLearner` owns a model and its optimizer. ``test_then_train``
scores a batch with the current weights (eval mode, no gradient), then takes
one optimizer step on it, and returns the pre-update predictions: the
honest, prequential view that the evaluation and the Ray trainer share.
The River baselines (:mod:`online_models.river_baselines`) expose the same
``predict_proba`` / ``learn`` / ``test_then_train`` verbs.

Sparse updates: the id tables (``embedding``, ``linear``) are most of the
parameters, and a batch of 16 touches 32 of their 40k rows. The learner
switches those lookups to sparse gradients (``nn.Embedding.sparse``, a flag
read at every forward: the model, its config and its state dict are
unchanged) and steps them with an optimizer that only touches the rows of
the batch: Adagrad and SGD take sparse gradients as they are (with no
weight decay on the ids, which the embedding L2 replaces, a sparse step is
the dense step restricted to the rows it changes: exactly the same maths);
Adam becomes SparseAdam for the ids (lazy Adam: the moments of an unseen row
do not decay) next to AdamW for the dense weights. Gradient clipping takes
the norm of the coalesced sparse gradients, so it clips as the dense one did.

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from online_models.models import CTRModel

#: the per-id tables of a CTR model (one row per hashed id): the parameters that get sparse gradients
ID_TABLES = ("embedding", "linear")

#: per-sample loss weights from (logits, labels) of a training step
WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LearnerConfig:
    """Optimizer settings of an :class:`OnlineLearner`."""

    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW) decay on dense weights only; embeddings use embedding_l2
    optimizer: str = "adam"  # "adam" | "sgd" | "adagrad"
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
        self._gen = torch.Generator().manual_seed(self.config.seed)  # dropout masks, reproducible per seed
        for name in ID_TABLES:
            getattr(model, name).sparse = True  # row-sparse gradients: a step touches the batch's rows only
        self._emb = [p for n, p in model.named_parameters() if n.startswith(tuple(f"{t}." for t in ID_TABLES))]
        self._dense = [p for n, p in model.named_parameters() if not n.startswith(tuple(f"{t}." for t in ID_TABLES))]
        self._params = [*self._emb, *self._dense]
        # modules whose mode matters (dropout); toggled directly, since Module.train()/eval() walks the whole tree
        # through Module.__setattr__ on every call (0.4 ms a step, a third of a batch-of-16 step)
        self._modules = list(model.modules())
        self.optimizers = self._make_optimizers()

    def _make_optimizers(self) -> list[torch.optim.Optimizer]:
        """One optimizer for the sparse id rows, one for the dense weights.

        Two, not two groups of one: an optimizer with any sparse gradient falls back to its one-tensor-at-a-time
        loop for every parameter, while the dense weights alone take the fused (one kernel) CPU step.
        """
        cfg = self.config
        emb_lr = cfg.embedding_lr or cfg.lr
        if cfg.optimizer == "adam":
            # AdamW refuses sparse gradients: lazy SparseAdam for the id rows, AdamW (decoupled decay) for the rest
            return [
                torch.optim.SparseAdam(self._emb, lr=emb_lr),
                torch.optim.AdamW(self._dense, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True),
            ]
        if cfg.optimizer == "adagrad":
            return [
                SparseAdagrad(self._emb, lr=emb_lr),
                torch.optim.Adagrad(self._dense, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True),
            ]
        return [
            torch.optim.SGD(self._emb, lr=emb_lr),
            torch.optim.SGD(self._dense, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True),
        ]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of the dense weights (``optimizers[0]`` steps the id rows)."""
        return self.optimizers[-1]

    def _set_training(self, mode: bool) -> None:
        for m in self._modules:
            object.__setattr__(m, "training", mode)  # a plain attribute: skip Module.__setattr__'s type checks

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities (B,) and hidden keys (B, H) with the current weights, in eval mode."""
        was = self.model.training
        self._set_training(False)
        try:
            logits, hidden = self.model(batch)
        finally:
            self._set_training(was)
        return torch.sigmoid(logits), hidden

    def predict_proba(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.predict(batch)[0]

    def learn(self, batch: dict[str, torch.Tensor], weight_fn: WeightFn | None = None) -> float:
        """One optimizer step on ``batch`` (needs ``label``); returns the training loss.

        ``weight_fn(logits, labels)`` gives per-sample loss weights from the step's own forward pass
        (the delayed-feedback corrections of :mod:`online_models.delayed` use it).
        """
        return self._step(batch, None, weight_fn)[0]

    def test_then_train(
        self,
        batch: dict[str, torch.Tensor],
        key_fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None,
    ) -> Any:
        """Score ``batch`` with the current weights, then learn from it; returns the pre-update probabilities.

        One forward pass serves both: the lookups and the layers before the first dropout are computed once,
        the eval-mode head (what :meth:`predict` gives) and the train-mode head run on them, then the step.
        With ``key_fn`` it returns ``(probabilities, key_fn(batch, hidden))``: the memory key of the
        pre-update model (``key_fn`` runs before the step, so any embedding it reads is pre-update too).
        """
        _, p, hidden = self._step(batch, key_fn or _no_key)
        return p if key_fn is None else (p, hidden)

    def _step(
        self, batch: dict[str, torch.Tensor], key_fn: Callable | None, weight_fn: WeightFn | None = None
    ) -> tuple[float, Any, Any]:
        if "label" not in batch:
            raise KeyError("learn() needs a batch with a 'label' tensor")
        self._set_training(True)
        p = key = None
        # the dropout masks come from the CPU generator re-seeded from the learner's own, and the global state is
        # restored after the step (what torch.random.fork_rng(devices=[]) does, without its context-manager and
        # device bookkeeping: ~15 us a step). Only the CPU generator: torch.manual_seed would also queue a lazy
        # CUDA/XPU/MTIA re-seed with a formatted stack trace per call (a list that grows by one entry per step)
        rng_state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._gen)))
            if key_fn is None:
                logits, _ = self.model(batch)
            else:
                logits_e, hidden_e, logits = self.model.forward_test_train(batch)
                p = torch.sigmoid(logits_e)
                with torch.no_grad():
                    key = key_fn(batch, hidden_e)
            y = batch["label"].float()
            weights = weight_fn(logits.detach(), y) if weight_fn is not None else None
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weights)
            total = loss + self.model.regularization()
            for param in self._params:
                param.grad = None  # Optimizer.zero_grad(set_to_none=True), without its profiler hooks
            total.backward()
        finally:
            torch.set_rng_state(rng_state)
        self.model._last_emb = None  # drop the graph reference (keeps the model deep-copyable)
        for param in self._emb:
            if param.grad is not None:
                param.grad = param.grad.coalesce()  # one entry per row: the norm below and the step need it anyway
        if self.config.grad_clip:
            clip_grad_norm([*self._emb, *self._dense], self.config.grad_clip)
        for opt in self.optimizers:
            if isinstance(opt, SparseAdagrad):
                with torch.no_grad():
                    opt.update()
            elif not (isinstance(opt, torch.optim.Adagrad) and _fused_adagrad_step(opt)):
                opt.step()
        self.steps += 1
        return float(loss.detach()), p, key

    def fit(self, batches: Iterable[dict[str, torch.Tensor]], epochs: int = 1) -> list[float]:
        """Plain mini-batch training (e.g. the warm-up of a base model); batches are re-iterated per epoch."""
        batches = list(batches)
        return [self.learn(b) for _ in range(epochs) for b in batches]

    def clone(self) -> OnlineLearner:
        """An independent copy (weights, optimizer state, step count and RNG state)."""
        twin = copy.deepcopy(self)
        return twin

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "steps": self.steps,
            "rng": self._gen.get_state(),
        }  # rng: the dropout masks continue, too

    def load_state_dict(self, state: dict[str, Any]) -> None:
        opts = state["optimizers"]
        if len(opts) != len(self.optimizers):
            raise ValueError(
                f"optimizer state has {len(opts)} optimizers, this learner ({self.config.optimizer}) "
                f"has {len(self.optimizers)}"
            )
        self.model.load_state_dict(state["model"])
        for opt, st in zip(self.optimizers, opts):
            opt.load_state_dict(st)
        self.steps = int(state["steps"])
        if "rng" in state:
            self._gen.set_state(state["rng"])


class SparseAdagrad(torch.optim.Optimizer):
    """Adagrad for row-sparse gradients: ``torch.optim.Adagrad``'s maths (lr_decay 0, no weight decay) on the rows
    a batch touched, in five indexed ops per table.

    ``torch.optim.Adagrad`` takes sparse gradients too, through its one-tensor loop that builds three sparse
    tensors per table per step (~150 us per batch-of-16 step here, a sixth of the whole step); this gathers the
    touched rows of the accumulator, adds the squared gradient, scatters them back and updates the same rows.
    Dense gradients (a table used without ``sparse=True``) are stepped as dense Adagrad.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-2,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator_value": initial_accumulator_value})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"] = torch.full_like(
                    p, initial_accumulator_value, memory_format=torch.preserve_format
                )

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:  # type: ignore[override]
        self.update()

    def update(self) -> None:
        """The step itself, without ``Optimizer.step``'s hook and profiler wrapper (the learner calls this)."""
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                acc = self.state[p]["sum"]
                if not g.is_sparse:
                    acc.addcmul_(g, g)
                    p.addcdiv_(g, acc.sqrt().add_(eps), value=-lr)
                    continue
                g = g.coalesce()
                rows, vals = g._indices()[0], g._values()
                acc_rows = acc.index_select(0, rows).addcmul_(vals, vals)
                acc.index_copy_(0, rows, acc_rows)
                p.index_add_(0, rows, vals / acc_rows.sqrt_().add_(eps), alpha=-lr)


def _fused_adagrad_step(opt: torch.optim.Adagrad) -> bool:
    """``opt.step()`` of a fused CPU Adagrad, as one ``torch._fused_adagrad_`` call per group; False (nothing done)
    when the optimizer is not in the plain state this handles, so the caller takes ``opt.step()``.

    The same two kernels ``torch.optim.Adagrad.step`` ends in (the step counters' add, then the fused update),
    so the weights are bitwise the same; what is skipped is the per-step Python of ``step`` (state look-ups, the
    device/dtype grouping, the profiler hooks): ~100 us of a ~800 us batch-of-16 step.
    """
    for group in opt.param_groups:
        if not group["fused"] or group["maximize"] or group["differentiable"]:
            return False
        if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
            return False
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [opt.state[p] for p in params]
        if any(len(st) == 0 or p.grad.is_sparse or p.device.type != "cpu" for st, p in zip(states, params)):
            return False  # a lazily initialised or unusual state: the library's own step handles it
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adagrad_(
            params,
            [p.grad for p in params],
            [st["sum"] for st in states],
            steps,
            lr=group["lr"],
            lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
    return True


def _no_key(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> None:
    return None


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``nn.utils.clip_grad_norm_`` for a mix of dense and (coalesced) sparse gradients; returns the total norm.

    A coalesced sparse gradient's norm is the norm of its values, which is the norm of the dense gradient it
    stands for, so this clips exactly as the dense version would.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    parts = [g._values() if g.is_sparse else g for g in grads]
    total = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(parts))))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(parts, coef)
    return total


def iter_batches(batch: dict[str, torch.Tensor], size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Consecutive slices of a batch dict (stream order kept).

    >>> [b["x"].tolist() for b in iter_batches({"x": torch.arange(5)}, 2)]
    [[0, 1], [2, 3], [4]]
    """
    n = len(next(iter(batch.values())))
    for lo in range(0, n, size):
        yield {k: v[lo : lo + size] for k, v in batch.items()}
