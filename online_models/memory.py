"""The ReLoop2 error-compensation memory (Zhu et al., KDD 2023), vectorised in torch.

Keys are a model's last hidden layer ``h`` (B, D). ``K`` independent SimHash
tables (random Gaussian hyperplanes, ``L`` bits each) map ``h`` to one of
``2^L`` buckets per table. A bucket holds the evidence of the samples that
hashed to it: a count, the sum of labels, the sum of base predictions and the
sum of keys (its centroid is the bucket's "key", used for the similarity).

Estimate, for a query ``h`` with base prediction ``y_base``:

- read the K buckets; each gives ``y_bar_k = sum_y/n``, ``p_bar_k = sum_p/n``
  and the centroid ``c_k = sum_h/n``;
- weights ``w = softmax(cos(h, c_k) / tau)`` over the K read-outs, with empty
  buckets (no evidence) masked out; a query with no evidence at all gets
  ``y_err = 0``;
- ``y_bar = sum_k w_k y_bar_k`` and ``y_base_bar = sum_k w_k p_bar_k``;
- ``y_err = gamma*(y_bar - y_base) + (1-gamma)*(y_bar - y_base_bar)``;
- compensated prediction ``clip(y_base + lam * s * y_err, 0, 1)``, where the
  optional shrinkage ``s = n/(n + shrinkage)`` (``n`` = the weighted count)
  keeps one or two neighbours from overriding the model (0 = the paper).

Optional ``decay`` (per written sample, in (0, 1]) makes old evidence fade:
a sample's weight is ``decay ** (samples written after it)``. This is done
by *forward decay*: a write adds its sample with weight ``decay ** -age``
(``age`` = samples written since the last renormalisation) and a read
multiplies counts back by ``decay ** age``; ratios (label and prediction
means, cosine similarities) need no correction at all. So a write costs
O(B*K) and never touches the rest of the table; once in a long while (when
the weight would pass 1e18) the whole table is rescaled. State is a fixed set of tensors
(the size never grows with the stream) that round-trips through
:meth:`state_dict`/:meth:`load_state_dict` and safetensors, without pickle.

>>> mem = ErrorCompensationMemory(dim=4, num_tables=2, bits=3, tau=1.0, gamma=1.0, lam=1.0, seed=0)
>>> h = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
>>> mem.estimate(h, torch.tensor([0.3]))   # no evidence yet: the base prediction
tensor([0.3000])
>>> mem.write(h, torch.tensor([1.0]), torch.tensor([0.3]))
>>> mem.estimate(h, torch.tensor([0.3]))   # the neighbour was a positive
tensor([1.])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch

STAT_NAMES = ("count", "sum_y", "sum_p")


class MemoryConfigError(ValueError):
    """A memory parameter out of range; the message names it and the allowed range."""


@dataclass(frozen=True)
class MemoryConfig:
    """Hyper-parameters of :class:`ErrorCompensationMemory` (see the module docstring)."""

    dim: int
    num_tables: int = 8
    bits: int = 8
    tau: float = 0.1
    gamma: float = 1.0
    lam: float = 0.5
    decay: float = 1.0
    shrinkage: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise MemoryConfigError(f"dim must be >= 1, got {self.dim}")
        if self.num_tables < 1:
            raise MemoryConfigError(f"num_tables (K) must be >= 1, got {self.num_tables}")
        if not 1 <= self.bits <= 24:
            raise MemoryConfigError(f"bits (L) must be in 1..24 (2^L buckets per table), got {self.bits}")
        if not self.tau > 0:
            raise MemoryConfigError(f"tau must be > 0, got {self.tau}")
        if not 0.0 <= self.gamma <= 1.0:
            raise MemoryConfigError(f"gamma must be in [0, 1], got {self.gamma}")
        if not self.lam >= 0.0:
            raise MemoryConfigError(f"lam (lambda) must be >= 0, got {self.lam}")
        if not 0.0 < self.decay <= 1.0:
            raise MemoryConfigError(f"decay must be in (0, 1] (1 = no decay), got {self.decay}")
        if not self.shrinkage >= 0.0:
            raise MemoryConfigError(f"shrinkage must be >= 0, got {self.shrinkage}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ErrorCompensationMemory:
    """K SimHash tables of 2^L buckets of (count, sum of labels, sum of base predictions, sum of keys)."""

    def __init__(self, dim: int, num_tables: int = 8, bits: int = 8, tau: float = 0.1, gamma: float = 1.0,
                 lam: float = 0.5, decay: float = 1.0, shrinkage: float = 0.0, seed: int = 0) -> None:
        self.config = MemoryConfig(dim, num_tables, bits, tau, gamma, lam, decay, shrinkage, seed)
        self.dim, self.num_tables, self.bits = dim, num_tables, bits
        self.tau, self.gamma, self.lam, self.decay, self.shrinkage, self.seed = tau, gamma, lam, decay, shrinkage, seed
        gen = torch.Generator().manual_seed(seed)
        # hyperplanes (D, K*L): one matmul hashes a batch into all K tables
        self.planes = torch.randn(dim, num_tables * bits, generator=gen)
        self._powers = (2 ** torch.arange(bits)).float()                                # (L,), exact to 2^24
        self._offsets = torch.arange(num_tables, dtype=torch.int64) * (1 << bits)    # (K,)
        self.reset()

    @classmethod
    def from_config(cls, config: MemoryConfig) -> "ErrorCompensationMemory":
        return cls(**config.to_dict())

    def reset(self) -> None:
        """Forget all evidence (the hyperplanes stay: they are configuration, fixed by the seed)."""
        n = self.num_tables << self.bits
        # one row per bucket: [count, sum_y, sum_p, sum_h (D)], so a batch is one gather / one index_add
        self.table = torch.zeros(n, len(STAT_NAMES) + self.dim, dtype=torch.float32)   # (K*2^L, 3+D)
        self.clock = torch.zeros((), dtype=torch.int64)                                 # samples written so far
        self.base = torch.zeros((), dtype=torch.int64)                                  # clock at last rescale

    @property
    def stats(self) -> torch.Tensor:
        """(K*2^L, 3) count, sum of labels, sum of base predictions per bucket (a view, not decayed)."""
        return self.table[:, :len(STAT_NAMES)]

    # -- hashing -------------------------------------------------------------------------------------

    def bucket_index(self, h: torch.Tensor) -> torch.Tensor:
        """Flat bucket ids (B, K) of keys ``h`` (B, D) in the K tables."""
        if h.dim() != 2 or h.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(h.shape)}")
        bits = (h.detach().float() @ self.planes > 0).view(-1, self.num_tables, self.bits)   # (B, K, L)
        return (bits.float() @ self._powers).long() + self._offsets                          # (B, K)

    def _age(self) -> int:
        return int(self.clock - self.base)

    # -- write / estimate ----------------------------------------------------------------------------

    def write(self, h: torch.Tensor, y: torch.Tensor, y_base: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Add a batch of labelled outcomes: keys (B, D), labels (B,), base predictions (B,).

        ``index`` is ``bucket_index(h)`` when the caller already has it (e.g. from the estimate of the same keys).
        """
        y, y_base = _vector(y, "y"), _vector(y_base, "y_base")
        if not (len(y) == len(y_base) == h.shape[0]):
            raise ValueError(f"h, y and y_base must have the same batch size, got {h.shape[0]}, {len(y)}, {len(y_base)}")
        if len(y) == 0:
            return
        flat = (self.bucket_index(h) if index is None else index).reshape(-1)   # (B*K,)
        vals = torch.cat([torch.ones(len(y), 1), y.float().unsqueeze(1), y_base.float().unsqueeze(1),
                          h.detach().float()], dim=1)                       # (B, 3+D)
        if self.decay != 1.0:
            # the batch is written "now" (after its samples): forward-decay weight decay ** -(age after the write)
            weight = self.decay ** -(self._age() + len(y))
            if weight > 1e18:                                               # rescale everything once, rarely
                self.table.mul_(self.decay ** self._age())
                self.base = self.clock.clone()
                weight = self.decay ** -len(y)
            vals = vals * weight
        b, c = vals.shape
        self.table.index_add_(0, flat, vals.unsqueeze(1).expand(b, self.num_tables, c).reshape(-1, c))
        self.clock = self.clock + len(y)

    def read(self, h: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The weighted neighbourhood of each key: ``y_bar``, ``y_base_bar``, ``count`` (B,) and ``has`` (B,) bool."""
        h = h.detach().float()
        idx = self.bucket_index(h) if index is None else index              # (B, K)
        rows = self.table[idx]                                              # (B, K, 3+D)
        n = rows[..., 0]                                                    # (B, K)
        has = n > 0
        safe = n.clamp(min=1e-12)
        y_bar_k, p_bar_k = rows[..., 1] / safe, rows[..., 2] / safe        # (B, K)
        # cosine(h, centroid) = cosine(h, sum of keys): the count cancels (and so does any decay factor)
        sum_h = rows[..., 3:]                                               # (B, K, D)
        dot = torch.bmm(sum_h, h.unsqueeze(-1)).squeeze(-1)                 # (B, K)
        sim = dot / (sum_h.norm(dim=-1).clamp(min=1e-8) * h.norm(dim=1, keepdim=True).clamp(min=1e-8))
        # empty buckets get weight exactly 0; a query with no evidence at all is flagged by ``has``
        w = torch.softmax((sim / self.tau).masked_fill(~has, -1e30), dim=1) * has   # (B, K)
        if self.decay != 1.0:
            n = n * self.decay ** self._age()
        return {"y_bar": (w * y_bar_k).sum(1), "y_base_bar": (w * p_bar_k).sum(1),
                "count": (w * n).sum(1), "has": has.any(dim=1)}

    def error(self, h: torch.Tensor, y_base: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``y_err`` (B,) as in ReLoop2 (0 where there is no evidence), shrinkage applied."""
        y_base = _vector(y_base, "y_base").float()
        r = self.read(h, index)
        err = self.gamma * (r["y_bar"] - y_base) + (1.0 - self.gamma) * (r["y_bar"] - r["y_base_bar"])
        if self.shrinkage > 0:
            err = err * r["count"] / (r["count"] + self.shrinkage)
        return torch.where(r["has"], err, torch.zeros_like(err))

    def estimate(self, h: torch.Tensor, y_base: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Compensated probabilities ``clip(y_base + lam * y_err, 0, 1)`` (B,), same dtype as ``y_base``."""
        y_base = _vector(y_base, "y_base")
        if self.lam == 0.0:
            return y_base.clone()
        out = (y_base.float() + self.lam * self.error(h, y_base, index)).clamp(0.0, 1.0)
        return out.to(y_base.dtype)

    def rebuild(self, samples: Iterable[dict[str, torch.Tensor]], model: torch.nn.Module,
                key_fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None) -> int:
        """Reset, then write ``samples`` (batches with a ``label``) keyed by ``model``'s hidden layer
        (or by ``key_fn(batch, hidden)``).

        Used when a new model version is deployed: its hidden space differs, so old keys are meaningless.
        Returns the number of samples written.
        """
        self.reset()
        was_training = model.training
        model.eval()
        written = 0
        try:
            with torch.no_grad():
                for batch in samples:
                    logits, hidden = model(batch)
                    key = hidden if key_fn is None else key_fn(batch, hidden)
                    self.write(key, batch["label"], torch.sigmoid(logits))
                    written += len(logits)
        finally:
            model.train(was_training)
        return written

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (safetensors-compatible); the hyper-parameters are in ``config``."""
        return {"planes": self.planes.clone(), "table": self.table.clone(), "clock": self.clock.clone().reshape(1),
                "base": self.base.clone().reshape(1)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"planes": self.planes, "table": self.table}
        missing = (set(expected) | {"clock", "base"}) - set(state)
        if missing:
            raise ValueError(f"memory state misses {', '.join(sorted(missing))}")
        for name, ref in expected.items():
            if tuple(state[name].shape) != tuple(ref.shape):
                raise ValueError(f"memory state {name} has shape {tuple(state[name].shape)}, "
                                 f"this memory needs {tuple(ref.shape)} (dim, K, L must match)")
        self.planes = state["planes"].to(self.planes.dtype).clone()
        self.table = state["table"].to(torch.float32).clone()
        self.clock = state["clock"].to(torch.int64).reshape(()).clone()
        self.base = state["base"].to(torch.int64).reshape(()).clone()

    def nbytes(self) -> int:
        """Bytes held by the state (constant in the stream length)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def __repr__(self) -> str:
        c = self.config
        return (f"ErrorCompensationMemory(dim={c.dim}, num_tables={c.num_tables}, bits={c.bits}, tau={c.tau}, "
                f"gamma={c.gamma}, lam={c.lam}, decay={c.decay}, shrinkage={c.shrinkage}, seed={c.seed})")


def _vector(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 1:
        raise ValueError(f"{name} must be a vector (B,), got shape {tuple(x.shape)}")
    return x
