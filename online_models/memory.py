"""The ReLoop2 error-compensation memory (Zhu et al., KDD 2023), vectorised in torch.

Keys are a model's last hidden layer ``h`` (B, D). ``K`` independent SimHash
tables (random Gaussian hyperplanes, ``L`` bits each) map ``h`` to one of
``2^L`` buckets per table: table ``k`` projects ``h`` on its ``L`` planes,
``z_k = h @ P_k`` (L,), and the signs of ``z_k`` are the bucket's code. A
bucket holds the evidence of the samples that hashed to it: a count, the sum
of labels, the sum of base predictions and the sum of their projections
``z_k`` (the projection of the bucket's key centroid, used for the similarity).

Estimate, for a query ``h`` with base prediction ``y_base``:

- read the K buckets; each gives ``y_bar_k = sum_y/n``, ``p_bar_k = sum_p/n``
  and the projected centroid ``c_k = sum_z/n``;
- weights ``w = softmax(cos(z_k, c_k) / tau)`` over the K read-outs, with empty
  buckets (no evidence) masked out; a query with no evidence at all gets
  ``y_err = 0``. The cosine is taken in each table's own L-dimensional random
  projection (a Johnson-Lindenstrauss sketch of the cosine between ``h`` and
  the bucket's centroid), so a bucket row is ``3 + L`` numbers whatever the
  key width: reads and writes move ``K * (3 + L)`` floats per sample, not
  ``K * (3 + D)`` (on ML-100K the full-width cosine, the sketch and even
  uniform weights give the same validation AUC to 0.001). ``tau = inf`` is
  the limit of that softmax, uniform weights over the non-empty buckets: then
  no similarity is computed and a row is just the 3 statistics;
- ``y_bar = sum_k w_k y_bar_k`` and ``y_base_bar = sum_k w_k p_bar_k``;
- ``y_err = gamma*(y_bar - y_base) + (1-gamma)*(y_bar - y_base_bar)``;
- compensated prediction ``clip(y_base + lam * s * y_err, eps, 1 - eps)``, where
  the optional shrinkage ``s = n/(n + shrinkage)`` (``n`` = the weighted count)
  keeps one or two neighbours from overriding the model (0 = the paper), and
  ``eps`` (0 = the paper's clip to [0, 1]) keeps a confident wrong correction
  from costing an unbounded logloss.

Optional ``decay`` (per written sample, in (0, 1]) makes old evidence fade:
a sample's weight is ``decay ** (samples written after it)``. This is done
by *forward decay*: a write adds its sample with weight ``decay ** -age``
(``age`` = samples written since the last renormalisation) and a read
multiplies counts back by ``decay ** age``; ratios (label and prediction
means, cosine similarities) need no correction at all. So a write costs
O(B*K*L) and never touches the rest of the table; once in a long while (when
the weight would pass 1e18) the whole table is rescaled. State is a fixed set of tensors
(the size never grows with the stream) that round-trips through
:meth:`state_dict`/:meth:`load_state_dict` and safetensors, without pickle.

Speed: with numba installed, hashing, estimate, write and the per-event step run as compiled kernels (one pass
over the batch's (event, table) pairs; the per-event step is the sequential loop itself), and the hyperplanes
are Gaussian entries rounded to int8 / 32, so a batch is projected by exact int8 matmuls. The tensor
implementations are the reference the kernels are tested against, and the fallback without numba.

>>> mem = ErrorCompensationMemory(dim=4, num_tables=2, bits=3, tau=1.0, gamma=1.0, lam=1.0, seed=0)
>>> h = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
>>> mem.estimate(h, torch.tensor([0.3]))   # no evidence yet: the base prediction
tensor([0.3000])
>>> mem.write(h, torch.tensor([1.0]), torch.tensor([0.3]))
>>> mem.estimate(h, torch.tensor([0.3]))   # the neighbour was a positive
tensor([1.])
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from online_models.errors import ReloopError

try:  # the compiled kernels (below); without numba the torch implementations run, with the same results
    import numba
except ImportError:  # pragma: no cover - the fallback itself is tested by switching the kernels off
    numba = None  # type: ignore[assignment]

STAT_NAMES = ("count", "sum_y", "sum_p")

#: The memory the serving paths (``reloop run``'s live loop, the scoring service) use unless told otherwise:
#: what ``reloop evaluate`` chose for ``incremental+memory`` on ML-100K's validation slot (events 40k-50k,
#: never a test slot; DCNv2 and DeepFM chose the same). ``key`` selects
#: :func:`online_models.models.memory_key`; the rest are :class:`MemoryConfig` fields.
from online_models.settings import SERVING_MEMORY  # noqa: E402,F401  (re-exported: the serving default)


class MemoryConfigError(ReloopError, ValueError):
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
    eps: float = 0.0
    seed: int = 0
    # hashing precision. "float32": every code bit is the sign of the exact dot product of the float32 key with its
    # plane (compiled path: three exact int8 matmuls on a 21-bit quantised key, a float64 fix-up near zero).
    # "bfloat16": one bf16 matmul, ~2x faster again on CPUs with AVX512-BF16/AMX, and ~0.04% of the code bits flip
    # (keys within bf16 rounding of a hyperplane: ~0.4% of the buckets at L=10 on a 416-wide key); much slower on
    # CPUs without bf16 units
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "bfloat16"):
            raise MemoryConfigError(f"precision must be float32 or bfloat16, got {self.precision!r}")
        if self.dim < 1:
            raise MemoryConfigError(f"dim must be >= 1, got {self.dim}")
        if self.num_tables < 1:
            raise MemoryConfigError(f"num_tables (K) must be >= 1, got {self.num_tables}")
        if not 1 <= self.bits <= 24:
            raise MemoryConfigError(f"bits (L) must be in 1..24 (2^L buckets per table), got {self.bits}")
        if not self.tau > 0:
            raise MemoryConfigError(f"tau must be > 0 (inf = uniform weights), got {self.tau}")
        if not 0.0 <= self.gamma <= 1.0:
            raise MemoryConfigError(f"gamma must be in [0, 1], got {self.gamma}")
        if not self.lam >= 0.0:
            raise MemoryConfigError(f"lam (lambda) must be >= 0, got {self.lam}")
        if not 0.0 < self.decay <= 1.0:
            raise MemoryConfigError(f"decay must be in (0, 1] (1 = no decay), got {self.decay}")
        if not self.shrinkage >= 0.0:
            raise MemoryConfigError(f"shrinkage must be >= 0, got {self.shrinkage}")
        if not 0.0 <= self.eps < 0.5:
            raise MemoryConfigError(
                f"eps must be in [0, 0.5) (the estimate is clipped to [eps, 1-eps]), got {self.eps}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Hashed:
    """Where a batch of keys falls: flat bucket ids (B, K) and each table's projections (B, K, L)."""

    index: torch.Tensor
    proj: torch.Tensor


class ErrorCompensationMemory:
    """K SimHash tables of 2^L buckets of (count, sum of labels, sum of base predictions, sum of projections)."""

    def __init__(
        self,
        dim: int,
        num_tables: int = 8,
        bits: int = 8,
        tau: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.5,
        decay: float = 1.0,
        shrinkage: float = 0.0,
        eps: float = 0.0,
        seed: int = 0,
        precision: str = "float32",
    ) -> None:
        self.config = MemoryConfig(dim, num_tables, bits, tau, gamma, lam, decay, shrinkage, eps, seed, precision)
        self.precision = precision
        self.dim, self.num_tables, self.bits = dim, num_tables, bits
        self.tau, self.gamma, self.lam, self.decay, self.shrinkage, self.eps = tau, gamma, lam, decay, shrinkage, eps
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        # hyperplanes (D, K*L): one matmul hashes a batch into all K tables. Gaussian entries rounded to multiples
        # of 1/32 in [-127/32, 127/32] (8-bit integers / 32): as good random hyperplanes as unrounded ones for
        # SimHash, and exact in int8, so the compiled path projects a batch with int8 matmuls (see hash)
        self.planes = (torch.randn(dim, num_tables * bits, generator=gen) * _PLANE_SCALE).round_().clamp_(-127, 127)
        self.planes /= _PLANE_SCALE
        self._set_planes(self.planes)
        self._powers = (2 ** torch.arange(bits)).float()  # (L,), exact to 2^24
        self._offsets = torch.arange(num_tables, dtype=torch.int64) * (1 << bits)  # (K,)
        self.reset()

    def _set_planes(self, planes: torch.Tensor) -> None:
        """The hyperplanes and their derived forms: bf16 (``precision="bfloat16"``), float64 (small batches) and
        int8 with the quantisation margins (large batches), the last only when the planes are int8-exact (a state
        saved before the planes were rounded is hashed by the float64 matmul instead) and int8 matmuls are the
        faster path on this CPU (:func:`_hash_by_int8`)."""
        self.planes = planes
        self._planes_bf16 = planes.bfloat16() if self.precision == "bfloat16" else None
        self._planes64 = planes.double()
        # per plane, |P_j|_1: bounds a float32 matmul's rounding of a projection (see _fix32_kernel)
        self._plane_l1 = self._planes64.abs().sum(0).numpy()
        ints = planes * _PLANE_SCALE
        self._planes_i8: torch.Tensor | None = None
        self._margin: np.ndarray | None = None
        exact = bool(torch.equal(ints, ints.round())) and float(ints.abs().max()) <= 127
        if exact and _hash_by_int8(self.dim, planes.shape[1]):
            self._planes_i8 = ints.to(torch.int8).contiguous()
            l1 = ints.abs().double().sum(0).numpy()  # (K*L,) |P_j|_1 in integer units
            # quantising a key moves its integer projection by at most |P_j|_1 / 2 (see _combine_kernel)
            self._margin = np.ceil(l1 * (0.5 + 1e-6)) + 1.0

    @classmethod
    def from_config(cls, config: MemoryConfig) -> ErrorCompensationMemory:
        return cls(**config.to_dict())

    def reset(self) -> None:
        """Forget all evidence (the hyperplanes stay: they are configuration, fixed by the seed)."""
        n = self.num_tables << self.bits
        # one flat table, one row per bucket of every table: [count, sum_y, sum_p, sum_z (L)], so a batch is
        # one index_select and one index_add_ whatever K is
        self.table = torch.zeros(n, len(STAT_NAMES) + self._sketch, dtype=torch.float32)  # (K*2^L, 3+L or 3)
        self.clock = torch.zeros((), dtype=torch.int64)  # samples written so far
        self.base = torch.zeros((), dtype=torch.int64)  # clock at last rescale

    @property
    def _sketch(self) -> int:
        """Projection sums per row: L for the cosine weights, none for uniform weights (tau = inf)."""
        return 0 if math.isinf(self.tau) else self.bits

    @property
    def stats(self) -> torch.Tensor:
        """(K*2^L, 3) count, sum of labels, sum of base predictions per bucket (a view, not decayed)."""
        return self.table[:, : len(STAT_NAMES)]

    # -- hashing -------------------------------------------------------------------------------------

    @torch.no_grad()
    def hash(self, h: torch.Tensor) -> Hashed:
        """Bucket ids and projections of keys ``h`` (B, D): compute once, pass to ``estimate`` and ``write``."""
        if h.dim() != 2 or h.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(h.shape)}")
        if USE_KERNELS:
            return self._hash_compiled(h.detach().float().contiguous())
        if self._planes_bf16 is not None:
            proj = (h.detach().bfloat16() @ self._planes_bf16).float().view(-1, self.num_tables, self.bits)
        else:
            proj = (h.detach().float() @ self.planes).view(-1, self.num_tables, self.bits)  # (B, K, L)
        ids = ((proj > 0).float() @ self._powers).long() + self._offsets  # (B, K)
        return Hashed(ids, proj)

    def _hash_compiled(self, h: torch.Tensor) -> Hashed:
        """``hash`` with the compiled kernels. float32 precision: every code bit is the sign of the exact (float64)
        dot product of the key with its plane, so the buckets are those of :func:`reference_hash`. A small batch is
        one float64 matmul. A large one is quantised to 21-bit integers per row (three int8 digits) and projected by
        three exact int8 matmuls (with VNNI several times a float32 matmul's speed), or, where those are slower (no
        int8 planes, see :meth:`_set_planes`), projected by one float32 matmul. Either way the few projections
        within the path's error bound of zero (~1 in 10^4) are recomputed in float64."""
        b, k, bits = h.shape[0], self.num_tables, self.bits
        index = torch.empty(b, k, dtype=torch.int64)
        if self._planes_bf16 is not None:  # opt-in bf16: ~0.1% of the code bits flip (keys near a plane)
            proj = (h.bfloat16() @ self._planes_bf16).float()
            _codes(proj.numpy(), k, bits, index.numpy())
        elif b <= _SMALL_BATCH:
            proj64 = h.double() @ self._planes64
            _codes(proj64.numpy(), k, bits, index.numpy())
            proj = proj64.float()
        elif self._planes_i8 is None:
            proj = h @ self.planes  # float32: about 3x one float64 matmul and its rounding to float32
            row_max = h.abs().amax(1).double().numpy()  # (B,) NaN/inf propagate: such a row is recomputed
            gamma = 2.0 * self.dim * 2.0**-24 / (1.0 - self.dim * 2.0**-24)  # twice the float32 dot product's bound
            _fix32(proj.numpy(), h.numpy(), self.planes.numpy(), row_max, self._plane_l1, gamma)
            _codes(proj.numpy(), k, bits, index.numpy())
        else:
            digits = torch.empty(3, b, self.dim, dtype=torch.int8)
            scale, bad = np.empty(b), np.empty(b, dtype=np.bool_)
            row_max = h.abs().amax(1).double().numpy()  # (B,) NaN/inf propagate: a non-finite row is flagged
            _quantize(h.numpy(), row_max, digits.numpy(), scale, bad)
            z2, z1, z0 = (torch._int_mm(digits[i], self._planes_i8).numpy() for i in range(3))
            proj = torch.empty(b, k * bits)
            _combine(
                z2,
                z1,
                z0,
                scale,
                bad,
                self._margin,
                h.numpy(),
                self.planes.numpy(),
                k,
                bits,
                proj.numpy(),
                index.numpy(),
            )
        return Hashed(index, proj.view(b, k, bits))

    def _run(
        self, hashed: Hashed, p: torch.Tensor, y: torch.Tensor | None, bounds: np.ndarray, estimate: bool
    ) -> torch.Tensor:
        """The compiled step over groups ``bounds``: estimate each (``estimate``), then write it (``y`` given)."""
        n = len(p)
        out = torch.empty(n, dtype=torch.float32)
        p32 = p.detach().float().contiguous()
        y32 = y.detach().float().contiguous() if y is not None else p32
        age = _step(
            self.table.numpy(),
            hashed.index.contiguous().numpy(),
            hashed.proj.float().contiguous().numpy(),
            p32.numpy(),
            y32.numpy(),
            bounds,
            self._age(),
            float(self.decay),
            float(self.tau),
            float(self.gamma),
            float(self.lam),
            float(self.shrinkage),
            float(self.eps),
            estimate,
            y is not None,
            out.numpy(),
        )
        if y is not None:
            self.clock = self.clock + n
            self.base = self.clock - int(age)
        return out

    def bucket_index(self, h: torch.Tensor) -> torch.Tensor:
        """Flat bucket ids (B, K) of keys ``h`` (B, D) in the K tables."""
        return self.hash(h).index

    def _hashed(self, h: torch.Tensor | None, hashed: Hashed | None) -> Hashed:
        """``hashed`` when the caller has it (``hash(h)`` of the same keys), else ``hash(h)``."""
        if hashed is not None:
            return hashed
        if h is None:
            raise ValueError("the keys h are needed when their hashed buckets are not given")
        return self.hash(h)

    def _age(self) -> int:
        return int(self.clock - self.base)

    # -- write / estimate ----------------------------------------------------------------------------

    @torch.no_grad()
    def write(
        self, h: torch.Tensor, y: torch.Tensor, y_base: torch.Tensor, hashed: Hashed | None = None, each: bool = False
    ) -> None:
        """Add a batch of labelled outcomes: keys (B, D), labels (B,), base predictions (B,).

        ``hashed`` is ``hash(h)`` when the caller already has it (e.g. from the estimate of the same keys).
        ``each``: the rows arrived one after another (each its own forward-decay weight, so the result does not
        depend on how a stream of arrivals is cut into calls); by default the batch arrives at once.
        """
        y, y_base = _vector(y, "y"), _vector(y_base, "y_base")
        if not (len(y) == len(y_base) == h.shape[0]):
            raise ValueError(
                f"h, y and y_base must have the same batch size, got {h.shape[0]}, {len(y)}, {len(y_base)}"
            )
        if len(y) == 0:
            return
        hashed = self._hashed(h, hashed)
        if USE_KERNELS:
            n = len(y)
            bounds = np.arange(n + 1) if each else np.array([0, n])
            self._run(hashed, y_base, y, bounds, estimate=False)
            return
        self._write_torch(hashed, y, y_base, each)

    def _write_torch(self, hashed: Hashed, y: torch.Tensor, y_base: torch.Tensor, each: bool = False) -> None:
        """``write`` as tensor ops (the reference of the compiled kernel, and its fallback)."""
        weight: float | torch.Tensor = 1.0
        if self.decay != 1.0:
            # the batch is written "now" (after its samples): forward-decay weight decay ** -(age after the write)
            if self.decay ** -(self._age() + len(y)) > 1e18:  # rescale everything once, rarely
                self.table.mul_(self.decay ** self._age())
                self.base = self.clock.clone()
            weight = self.decay ** -(self._age() + len(y))
            if each:
                ages = torch.arange(1, len(y) + 1, dtype=torch.float64) + self._age()
                weight = torch.pow(self.decay, -ages).float().unsqueeze(1)  # (B, 1)
        self._add(hashed, y.float(), y_base.float(), weight)
        self.clock = self.clock + len(y)

    def _add(self, hashed: Hashed, y: torch.Tensor, y_base: torch.Tensor, weight: float | torch.Tensor) -> None:
        """Add rows' weighted evidence to their buckets; ``weight`` a number or (B, 1) per row."""
        b, k = hashed.index.shape
        if not isinstance(weight, torch.Tensor):
            weight = torch.tensor(weight, dtype=torch.float32)  # a 0-d float32: the same rounding as a scalar
        vals = torch.empty(b, k, self.table.shape[1])  # (B, K, 3+L)
        vals[:, :, 0] = weight
        vals[:, :, 1] = (y.unsqueeze(1) * weight) if weight.dim() else (y * weight).unsqueeze(1)
        vals[:, :, 2] = (y_base.unsqueeze(1) * weight) if weight.dim() else (y_base * weight).unsqueeze(1)
        if self._sketch:
            torch.mul(hashed.proj, weight.unsqueeze(-1) if weight.dim() else weight, out=vals[:, :, 3:])
        # index_put_(accumulate) sums repeated buckets like index_add_, about twice as fast on CPU
        self.table.index_put_((hashed.index.view(-1),), vals.view(b * k, -1), accumulate=True)

    @torch.no_grad()
    def read(
        self,
        h: torch.Tensor | None,
        hashed: Hashed | None = None,
        age: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The weighted neighbourhood of each key: ``y_bar``, ``y_base_bar``, ``count`` (B,) and ``has`` (B,) bool.

        ``age`` (B,) is each row's read time in samples since the last rescale (default: now, for all rows);
        ``rows`` (B, K, 3+L) the bucket rows to read instead of the table's current ones.
        """
        hashed = self._hashed(h, hashed)
        b, k = hashed.index.shape
        if rows is None:
            rows = self.table.index_select(0, hashed.index.view(-1)).view(b, k, -1)  # (B, K, 3+L)
        n = rows[..., 0]  # (B, K)
        has = n > 0
        if self._sketch:
            # cosine(z, centroid): the centroid sum_z / n, not sum_z itself, whose square overflows float32 once
            # forward-decay weights near the rescale limit (1e18) multiply it
            sum_z = rows[..., 3:] / n.clamp(min=1e-30).unsqueeze(-1)  # (B, K, L)
            dot = (sum_z * hashed.proj).sum(-1)  # (B, K)
            norms = (sum_z.square().sum(-1) * hashed.proj.square().sum(-1)).clamp_(min=1e-16).rsqrt_()
            # softmax over the non-empty buckets (shifted by the best one, so no tau underflows): empty buckets
            # get weight exactly 0, and a query with no evidence at all is flagged by ``has``
            logits = dot.mul_(norms).div_(self.tau).masked_fill_(~has, -float("inf"))  # (B, K)
            shift = logits.amax(dim=1, keepdim=True).clamp_(min=-1e30)
            w = logits.sub_(shift).exp_()  # (B, K) unnormalised, 0 where empty
        else:
            w = has.float()  # tau = inf: uniform over non-empty
        # [sum w, sum w*y_bar_k, sum w*p_bar_k] in one pass (w/n_k times each bucket's [n_k, sum_y_k, sum_p_k])
        sums = ((w / n.clamp(min=1e-12)).unsqueeze(-1) * rows[..., :3]).sum(1)  # (B, 3)
        z = sums[:, 0].clamp(min=1e-30)
        y_bar, p_bar, count = sums[:, 1] / z, sums[:, 2] / z, (w * n).sum(1) / z
        if self.decay != 1.0:
            count = count * (self.decay ** self._age() if age is None else torch.pow(self.decay, age).float())
        return {"y_bar": y_bar, "y_base_bar": p_bar, "count": count, "has": has.any(dim=1)}

    def error(self, h: torch.Tensor | None, y_base: torch.Tensor, hashed: Hashed | None = None) -> torch.Tensor:
        """``y_err`` (B,) as in ReLoop2 (0 where there is no evidence), shrinkage applied."""
        return self._error(self.read(h, hashed), _vector(y_base, "y_base").float())

    def _error(self, r: dict[str, torch.Tensor], y_base: torch.Tensor) -> torch.Tensor:
        err = self.gamma * (r["y_bar"] - y_base) + (1.0 - self.gamma) * (r["y_bar"] - r["y_base_bar"])
        if self.shrinkage > 0:
            err = err * r["count"] / (r["count"] + self.shrinkage)
        return torch.where(r["has"], err, torch.zeros_like(err))

    @torch.no_grad()
    def estimate(self, h: torch.Tensor | None, y_base: torch.Tensor, hashed: Hashed | None = None) -> torch.Tensor:
        """Compensated probabilities ``clip(y_base + lam * y_err, eps, 1 - eps)`` (B,), same dtype as ``y_base``.

        A query with no evidence gets ``y_base`` itself (unclipped), so an empty memory changes nothing.
        """
        y_base = _vector(y_base, "y_base")
        if self.lam == 0.0:
            return y_base.clone()
        hashed = self._hashed(h, hashed)
        if USE_KERNELS:
            return self._run(hashed, y_base, None, np.array([0, len(y_base)]), estimate=True).to(y_base.dtype)
        return self._estimate_torch(hashed, y_base)

    def _estimate_torch(self, hashed: Hashed, y_base: torch.Tensor) -> torch.Tensor:
        """``estimate`` as tensor ops (the reference of the compiled kernel, and its fallback)."""
        if self.lam == 0.0:
            return y_base.clone()
        r = self.read(None, hashed)
        p = y_base.float()
        out = (p + self.lam * self._error(r, p)).clamp(self.eps, 1.0 - self.eps)
        return torch.where(r["has"], out, p).to(y_base.dtype)

    def step(
        self, h: torch.Tensor, y_base: torch.Tensor, y: torch.Tensor, groups: list[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """Estimate a batch, then write its outcomes; returns the compensated predictions.

        ``groups`` (see :func:`write_groups`) are consecutive row ranges estimated together and written
        before the next is estimated; None = the whole batch at once. The batch is hashed once, and the
        groups are processed together (:meth:`step_per_event`): the result is that of the group-by-group loop
        (:meth:`step_sequential`), without one read and one write per group.
        """
        hashed = self.hash(h)
        if USE_KERNELS:  # one compiled pass: each group estimated, then written
            return self.step_per_event(hashed, y_base, y, [(0, len(y_base))] if groups is None else groups)
        if groups is None or len(groups) == 1:
            out = self.estimate(h, y_base, hashed)
            self.write(h, y, y_base, hashed)
            return out
        return self.step_per_event(hashed, y_base, y, groups)

    def step_sequential(
        self, h: torch.Tensor, y_base: torch.Tensor, y: torch.Tensor, groups: list[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """The reference: for each group in order (default: each event), estimate it, then write it."""
        groups = [(i, i + 1) for i in range(len(y_base))] if groups is None else groups
        hashed = self.hash(h)
        out = torch.empty_like(y_base)
        for lo, hi in groups:
            part = Hashed(hashed.index[lo:hi], hashed.proj[lo:hi])
            out[lo:hi] = self._estimate_torch(part, y_base[lo:hi])
            self._write_torch(part, y[lo:hi].float(), y_base[lo:hi].float())
        return out

    @torch.no_grad()
    def step_per_event(
        self, hashed: Hashed, y_base: torch.Tensor, y: torch.Tensor, groups: list[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """Per-event (or per-group) memory semantics for a whole batch, in one read and one write.

        Same result as :meth:`step_sequential` (up to float32 rounding): group ``g`` (default: each event
        alone) is estimated with every earlier group's outcome written and none of its own or later ones,
        then written. Instead of one round per chain of events that share a bucket (on ML-100K with the
        served K=32, L=10 and the ``hidden+user`` key, a batch of 512 events needs ~280 such rounds: some
        table links almost every pair of a user's events), every (event, table) reads its bucket as the
        table holds it before the batch *plus* the evidence of the earlier groups of the batch in the same
        bucket: an exclusive prefix sum within each bucket, in stream order (one stable sort of the B*K
        bucket ids, one float64 cumulative sum). Then the whole batch is written at once. With decay each
        row is read at its own time and written with its group's own forward-decay weight.
        """
        y_base, y = _vector(y_base, "y_base"), _vector(y, "y")
        n = len(y_base)
        if not (len(y) == n == hashed.index.shape[0]):
            raise ValueError(
                f"keys, y and y_base must have the same batch size, got {hashed.index.shape[0]}, {len(y)}, {n}"
            )
        if n == 0:
            return y_base.clone()
        if USE_KERNELS:
            bounds = np.arange(n + 1) if groups is None else _group_bounds(groups, n)
            return self._run(hashed, y_base, y, bounds, estimate=True).to(y_base.dtype)
        if n == 1 or (groups is not None and len(groups) == 1):
            out = self.estimate(None, y_base, hashed)  # one group: estimate, then write
            self.write(hashed.index, y, y_base, hashed)
            return out
        if groups is None:
            group_of, lo, hi = torch.arange(n), torch.arange(n), torch.arange(1, n + 1)
        else:
            lo = torch.tensor([g[0] for g in groups], dtype=torch.int64)
            hi = torch.tensor([g[1] for g in groups], dtype=torch.int64)
            sizes = hi - lo
            if int(sizes.sum()) != n or int(lo[0]) != 0 or bool((lo[1:] != hi[:-1]).any()) or bool((sizes < 1).any()):
                raise ValueError("groups must be consecutive, non-empty row ranges covering the batch")
            group_of = torch.repeat_interleave(torch.arange(len(groups)), sizes)  # (B,)
            lo, hi = lo[group_of], hi[group_of]  # per row
        if self.decay != 1.0 and self.decay ** -(self._age() + n) > 1e18:
            # rescale once before the batch (the sequential loop would do it at the group that crosses the limit:
            # the same arithmetic up to rounding, since ratios need no correction)
            self.table.mul_(self.decay ** self._age())
            self.base = self.clock.clone()
        age0 = self._age()
        p, yf = y_base.float(), y.float()
        if self.decay != 1.0:
            weight = torch.pow(self.decay, -(age0 + hi).double()).float().unsqueeze(1)  # (B, 1)
            read_age = (age0 + lo).double()
        else:
            weight, read_age = torch.ones(n, 1), None
        b, k = hashed.index.shape
        c = self.table.shape[1]
        vals = torch.empty(b, k, c)  # (B, K, 3+L) this batch's evidence
        vals[:, :, 0] = weight
        vals[:, :, 1] = yf.unsqueeze(1) * weight
        vals[:, :, 2] = p.unsqueeze(1) * weight
        if self._sketch:
            torch.mul(hashed.proj, weight.unsqueeze(-1), out=vals[:, :, 3:])
        flat = hashed.index.reshape(-1)
        rows = self.table.index_select(0, flat)  # (B*K, 3+L) before the batch
        # by bucket, stream order within; int32 ids sort ~1.5x faster than int64 when they fit
        sb, order = torch.sort(flat.int() if self.table.shape[0] < 2**31 else flat, stable=True)
        sg = group_of.repeat_interleave(k).index_select(0, order)  # group of each sorted entry
        m = len(sb)
        pos = torch.arange(m)
        new_bucket = torch.ones(m, dtype=torch.bool)
        torch.ne(sb[1:], sb[:-1], out=new_bucket[1:])
        new_run = new_bucket.clone()  # a new (bucket, group) run
        new_run[1:] |= sg[1:] != sg[:-1]
        seg_start = torch.cummax(pos * new_bucket, 0).values
        run_start = torch.cummax(pos * new_run, 0).values
        # float64: forward-decay weights reach 1e18, and a float32 running sum over the whole batch would lose a
        # bucket's few entries against the others
        sorted_vals = vals.view(-1, c).index_select(0, order).double()
        cum = torch.zeros(m + 1, c, dtype=torch.float64)  # cum[t] = sum of entries < t
        torch.cumsum(sorted_vals, 0, out=cum[1:])
        # earlier groups' evidence in the same bucket (0 for the first group of a bucket), back in row order
        before = (cum.index_select(0, run_start) - cum.index_select(0, seg_start)).float()  # (B*K, C) sorted
        inverse = torch.empty_like(order).scatter_(0, order, pos)
        rows += before.index_select(0, inverse)
        rows = rows.view(b, k, c)
        r = self.read(None, hashed, read_age, rows=rows)
        if self.lam == 0.0:
            out = p.clone()
        else:
            out = torch.where(r["has"], (p + self.lam * self._error(r, p)).clamp(self.eps, 1.0 - self.eps), p)
        self.table.index_put_((flat,), vals.view(b * k, c), accumulate=True)
        self.clock = self.clock + n
        return out.to(y_base.dtype)

    def rebuild(
        self,
        samples: Iterable[dict[str, torch.Tensor]],
        model: torch.nn.Module,
        key_fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None,
    ) -> int:
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
        return {
            "planes": self.planes.clone(),
            "table": self.table.clone(),
            "clock": self.clock.clone().reshape(1),
            "base": self.base.clone().reshape(1),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"planes": self.planes, "table": self.table}
        missing = (set(expected) | {"clock", "base"}) - set(state)
        if missing:
            raise ValueError(f"memory state misses {', '.join(sorted(missing))}")
        for name, ref in expected.items():
            if tuple(state[name].shape) != tuple(ref.shape):
                raise ValueError(
                    f"memory state {name} has shape {tuple(state[name].shape)}, "
                    f"this memory needs {tuple(ref.shape)} (dim, K, L must match)"
                )
        self._set_planes(state["planes"].to(self.planes.dtype).clone())
        self.table = state["table"].to(torch.float32).clone()
        self.clock = state["clock"].to(torch.int64).reshape(()).clone()
        self.base = state["base"].to(torch.int64).reshape(()).clone()

    def nbytes(self) -> int:
        """Bytes held by the state (constant in the stream length)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ErrorCompensationMemory(dim={c.dim}, num_tables={c.num_tables}, bits={c.bits}, tau={c.tau}, "
            f"gamma={c.gamma}, lam={c.lam}, decay={c.decay}, shrinkage={c.shrinkage}, eps={c.eps}, "
            f"seed={c.seed}, precision={c.precision!r})"
        )


def _group_bounds(groups: list[tuple[int, int]], n: int) -> np.ndarray:
    """Row bounds (G+1,) of consecutive, non-empty groups covering ``n`` rows, or a ValueError."""
    bounds = np.fromiter((g for pair in groups for g in pair), dtype=np.int64, count=2 * len(groups)).reshape(-1, 2)
    if (
        len(bounds) == 0
        or bounds[0, 0] != 0
        or bounds[-1, 1] != n
        or bool((bounds[1:, 0] != bounds[:-1, 1]).any())
        or bool((bounds[:, 1] <= bounds[:, 0]).any())
    ):
        raise ValueError("groups must be consecutive, non-empty row ranges covering the batch")
    return np.append(bounds[:, 0], n)


def reference_hash(mem: ErrorCompensationMemory, h: torch.Tensor) -> torch.Tensor:
    """Bucket ids (B, K) of keys ``h`` from a float64 matmul with the hyperplanes: the semantics of ``hash``
    (float32 precision), written the plain way, for tests and the benchmark's agreement rate."""
    proj = (h.detach().double() @ mem.planes.double()).view(-1, mem.num_tables, mem.bits)
    return ((proj > 0).long() << torch.arange(mem.bits)).sum(-1) + mem._offsets


def _vector(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 1:
        raise ValueError(f"{name} must be a vector (B,), got shape {tuple(x.shape)}")
    return x


MEMORY_WRITES = ("timestamp", "event", "batch")


def write_groups(ts: np.ndarray, mode: str) -> list[tuple[int, int]]:
    """Consecutive groups of a batch that are scored together, then written to the memory.

    ``timestamp``: events of the same time together (an outcome is known before any later event is
    scored); ``event``: one by one; ``batch``: the whole batch at once.

    >>> write_groups(np.array([5, 5, 7, 9, 9]), "timestamp")
    [(0, 2), (2, 3), (3, 5)]
    >>> write_groups(np.array([5, 5, 7]), "batch"), len(write_groups(np.array([5, 5, 7]), "event"))
    ([(0, 3)], 3)
    """
    n = len(ts)
    if mode == "batch":
        return [(0, n)]
    if mode == "event":
        return [(i, i + 1) for i in range(n)]
    edges = [0, *(np.flatnonzero(np.diff(ts)) + 1).tolist(), n]
    return list(zip(edges[:-1], edges[1:]))


# -- compiled kernels ----------------------------------------------------------------------------------------------
# The memory's work per event is small (K buckets of 3 + L numbers), so as tensor ops it is ~30 passes over (B, K, L)
# arrays plus their per-op overhead, and the per-event semantics need the prefix-sum construction of step_per_event.
# In machine code (numba) it is one pass: each (event, table) pair reads its bucket row, the K read-outs are
# softmax-weighted, and the group's outcomes are added before the next group is read, i.e. the sequential
# reference loop itself. The torch implementations above are the fallback when numba is not installed (and the
# reference the tests hold the kernels to).

#: run the compiled kernels when numba is installed (tests switch this off to run the torch paths)
USE_KERNELS = numba is not None

#: hash large batches with three int8 matmuls (True), one float32 matmul (False), or whichever this CPU runs
#: faster (None: timed once per process and key shape, see :func:`_int8_matmul_pays`). Both give the same buckets.
INT8_MATMUL: bool | None = None

#: forward-decay weights past this rescale the table (see the module docstring)
_RESCALE_LIMIT = 1e18
#: hyperplane entries are integers / _PLANE_SCALE in [-127, 127] / _PLANE_SCALE (int8-exact; see _planes)
_PLANE_SCALE = 32.0
#: keys are quantised to 21-bit integers per row, as three signed 7-bit digits (int8 matmuls)
_Q_MAX = (1 << 20) - 1
#: batches up to this size are hashed with one float64 matmul (exact, and cheaper than three int8 ones there)
_SMALL_BATCH = 32


@functools.cache
def _int8_matmul_pays(dim: int, width: int) -> bool:
    """Whether three int8 matmuls of a (2048, ``dim``) batch with the planes beat one float32 matmul on this CPU.

    With VNNI (AVX512-VNNI, AVX-VNNI) ``torch._int_mm`` runs several times faster than a float matmul; without it,
    torch falls back to a plain kernel: on an AVX2-only EPYC one took 304 ms for 20,000 x 40 x 320, against 63 ms
    in float64 and 19 ms in float32, and hashing 20,000 keys took 1,053 ms (``reloop run``'s version swaps: 70 s
    instead of 10). So the choice is measured, once per process and key shape (a few ms), instead of assumed."""
    g = torch.Generator().manual_seed(0)
    digits = torch.randint(-64, 65, (2048, dim), dtype=torch.int8, generator=g)
    planes = torch.randint(-127, 128, (dim, width), dtype=torch.int8, generator=g)
    keys, planes64 = digits.float(), planes.float()

    def best(fn: Callable[[], Any]) -> float:
        fn()  # the first call allocates and picks its kernel
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return 3 * best(lambda: torch._int_mm(digits, planes)) < best(lambda: keys @ planes64)


def _hash_by_int8(dim: int, width: int) -> bool:
    """The large-batch hash path: ``INT8_MATMUL`` when set, else what :func:`_int8_matmul_pays` measured."""
    return INT8_MATMUL if INT8_MATMUL is not None else _int8_matmul_pays(dim, width)


def _njit(fn: Callable) -> Any:
    # fastmath without nnan/ninf: empty buckets are -inf logits, and a bad key may be NaN
    return (
        numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "arcp"})(fn) if numba is not None else None
    )


def _quantize_kernel(h, row_max, digits, scale, bad):  # pragma: no cover - compiled
    """Row i of ``h`` as ``scale[i] * (d2 * 2^14 + d1 * 2^7 + d0)``, each digit in [-64, 64] (``digits`` (3, B, D)
    int8: d2, d1, d0), given each row's largest magnitude ``row_max`` (float64; NaN or inf when the row has a
    non-finite entry: then ``bad[i]``, and the caller's float64 path hashes that row)."""
    n, d = h.shape
    for i in range(n):
        m = row_max[i]
        bad[i] = not m < np.inf
        if bad[i] or m == 0.0:
            scale[i] = 0.0
            for j in range(d):
                digits[0, i, j] = digits[1, i, j] = digits[2, i, j] = 0
            continue
        scale[i] = m / _Q_MAX
        inv = _Q_MAX / m
        for j in range(d):  # float arithmetic (exact: integers below 2^21), branch-free, vectorised
            q = np.rint(np.float64(h[i, j]) * inv)
            d2 = np.floor((q + 8192.0) * (1.0 / 16384.0))
            r = q - d2 * 16384.0
            d1 = np.floor((r + 64.0) * (1.0 / 128.0))
            digits[0, i, j] = np.int8(d2)
            digits[1, i, j] = np.int8(d1)
            digits[2, i, j] = np.int8(r - d1 * 128.0)


def _combine_kernel(z2, z1, z0, scale, bad, margin, h, planes, num_tables, bits, proj, index):  # pragma: no cover
    """Projections and bucket ids from the three digit products: ``proj = scale * (z2 * 2^14 + z1 * 2^7 + z0)`` /
    plane scale, exact in integers (and in float64: below 2^53). The key's quantisation moves a projection by at
    most ``scale / 2 * |P_j|_1``, so where the integer projection is within ``margin[j]`` (that bound in integer
    units) of zero its sign is not settled by it, and the projection is recomputed in float64 from the key itself.
    So every sign is the sign of the (float64) dot product of the float32 key with the plane, as
    :func:`reference_hash` computes it."""
    n, width = z2.shape
    d = h.shape[1]
    zf = np.empty(width, dtype=np.float64)
    for i in range(n):
        unsettled = False
        for j in range(width):  # branch-free, vectorised
            v = np.float64(z2[i, j]) * 16384.0 + np.float64(z1[i, j]) * 128.0 + np.float64(z0[i, j])
            zf[j] = v
            unsettled |= abs(v) <= margin[j]
        si = scale[i] / _PLANE_SCALE
        for j in range(width):
            proj[i, j] = zf[j] * si
        if unsettled or bad[i]:
            for j in range(width):
                if bad[i] or abs(zf[j]) <= margin[j]:
                    acc = 0.0
                    for t in range(d):
                        acc += np.float64(h[i, t]) * np.float64(planes[t, j])
                    zf[j] = acc
                    proj[i, j] = acc
        for k in range(num_tables):
            code = 0
            for b in range(bits):
                if zf[k * bits + b] > 0:
                    code |= 1 << b
            index[i, k] = code + (k << bits)


def _fix32_kernel(proj, h, planes, row_max, plane_l1, gamma):  # pragma: no cover - compiled
    """Settle a float32 matmul's projections ``proj`` (B, K*L) in place, for :func:`_codes_kernel`. Rounding moves a
    float32 dot product of length D by at most gamma_D * sum_t |h_t P_tj| <= gamma_D * max|h| * |P_j|_1 (any
    summation order), so where a projection is within ``gamma`` (twice that factor) * ``row_max[i]`` *
    ``plane_l1[j]`` of zero, or its row is not finite, it is recomputed in float64 from the key (a positive value
    too small for float32 is kept positive). Every sign is then the (float64) dot product's, as
    :func:`reference_hash` computes it."""
    n, width = proj.shape
    d = h.shape[1]
    tiny = np.float32(1e-45)
    for i in range(n):
        m = row_max[i]
        bad = not m < np.inf
        lim = np.float32(gamma * m) if not bad else np.float32(0.0)
        unsettled = False
        for j in range(width):  # branch-free, vectorised
            unsettled |= abs(proj[i, j]) <= lim * np.float32(plane_l1[j])
        if unsettled or bad:
            for j in range(width):
                if bad or abs(proj[i, j]) <= lim * np.float32(plane_l1[j]):
                    v = 0.0
                    for t in range(d):
                        v += np.float64(h[i, t]) * np.float64(planes[t, j])
                    proj[i, j] = max(np.float32(v), tiny) if v > 0 else np.float32(v)


def _codes_kernel(proj, num_tables, bits, index):  # pragma: no cover - compiled
    """Bucket ids (B, K) from projections (B, K*L): bit b of table k set where projection k*L + b > 0."""
    n = proj.shape[0]
    for i in range(n):
        for k in range(num_tables):
            code = 0
            for b in range(bits):
                if proj[i, k * bits + b] > 0:
                    code |= 1 << b
            index[i, k] = code + (k << bits)


def _step_kernel(
    table, index, proj, p, y, bounds, age0, decay, tau, gamma, lam, shrinkage, eps, estimate, write, out
):  # pragma: no cover - compiled
    """For each group ``bounds[g]:bounds[g+1]`` in order: estimate its rows (``estimate``), then add their outcomes
    (``write``): :meth:`ErrorCompensationMemory.step_sequential`. ``out`` (B,) gets the compensated predictions.
    Returns the age (samples since the last rescale) after the batch; the table is rescaled in place when a group's
    weight would pass the limit, after its estimate and before its write, as the sequential loop does."""
    num_tables = index.shape[1]
    width = table.shape[1]
    sketch = width - 3
    logits = np.empty(num_tables, dtype=np.float64)
    counts = np.empty(num_tables, dtype=np.float64)
    ys = np.empty(num_tables, dtype=np.float64)
    ps = np.empty(num_tables, dtype=np.float64)
    age = age0
    for g in range(len(bounds) - 1):
        lo, hi = bounds[g], bounds[g + 1]
        size = hi - lo
        if estimate:
            read_scale = decay**age if decay != 1.0 else 1.0
            for i in range(lo, hi):
                best = -np.inf
                has = False
                for k in range(num_tables):
                    row = index[i, k]
                    n = np.float64(table[row, 0])
                    counts[k], ys[k], ps[k] = n, table[row, 1], table[row, 2]
                    if n > 0:
                        has = True
                        lg = 0.0
                        if sketch:
                            # cosine of the query's and the centroid's projections (centroid = sum_z / n: sum_z's
                            # square could overflow near the rescale limit)
                            # float32, as the tensor reference computes it (and twice as fast as float64 here)
                            inv = np.float32(1.0) / max(table[row, 0], np.float32(1e-30))
                            dot = cc = zz = np.float32(0.0)
                            for b in range(sketch):
                                cb = table[row, 3 + b] * inv
                                zb = proj[i, k, b]
                                dot += cb * zb
                                cc += cb * cb
                                zz += zb * zb
                            lg = np.float64(dot / np.sqrt(max(cc * zz, np.float32(1e-16)))) / tau
                        logits[k] = lg
                        if lg > best:
                            best = lg
                    else:
                        logits[k] = -np.inf
                if not has or lam == 0.0:
                    out[i] = p[i]
                    continue
                s0 = s1 = s2 = sn = 0.0
                for k in range(num_tables):
                    if logits[k] == -np.inf:
                        continue
                    n = counts[k]
                    w = math.exp(logits[k] - best) if sketch else 1.0
                    # w / n times the bucket's sums, with n floored at 1e-12 as the tensor reference does (a bucket
                    # whose decayed count fell below that, in table units, weighs less)
                    wn = w / max(n, 1e-12)
                    s0 += wn * n
                    s1 += wn * ys[k]
                    s2 += wn * ps[k]
                    sn += w * n
                pi = np.float64(p[i])
                y_bar, p_bar = s1 / s0, s2 / s0
                err = gamma * (y_bar - pi) + (1.0 - gamma) * (y_bar - p_bar)
                if shrinkage > 0:
                    count = sn / s0 * read_scale
                    err = err * count / (count + shrinkage)
                out[i] = min(max(pi + lam * err, eps), 1.0 - eps)
        if write:
            if decay != 1.0 and decay ** -(age + size) > _RESCALE_LIMIT:  # rescale everything once, rarely
                f = np.float32(decay**age)
                for r in range(table.shape[0]):
                    for c in range(width):
                        table[r, c] *= f
                age = 0
            w32 = np.float32(decay ** -(age + size)) if decay != 1.0 else np.float32(1.0)
            for i in range(lo, hi):
                wy, wp = np.float32(y[i]) * w32, np.float32(p[i]) * w32
                for k in range(num_tables):
                    row = index[i, k]
                    table[row, 0] += w32
                    table[row, 1] += wy
                    table[row, 2] += wp
                    for b in range(sketch):
                        table[row, 3 + b] += proj[i, k, b] * w32
            age += size
    return age


_quantize = _njit(_quantize_kernel)
_combine = _njit(_combine_kernel)
_codes = _njit(_codes_kernel)
_fix32 = _njit(_fix32_kernel)
_step = _njit(_step_kernel)
