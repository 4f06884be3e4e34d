"""The error-compensation memory against a brute-force reference and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import online_models.memory as memory_mod
from online_models.memory import ErrorCompensationMemory, MemoryConfigError, reference_hash


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def kernels(request, monkeypatch) -> str:
    """Every test runs on the compiled kernels and on the torch implementations (the fallback without numba)."""
    if request.param == "compiled" and memory_mod.numba is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(memory_mod, "USE_KERNELS", request.param == "compiled")
    return request.param


def _brute_force(mem: ErrorCompensationMemory, writes, h: torch.Tensor, y_base: torch.Tensor) -> list[float]:
    """Per-sample Python reference: recompute every bucket from the raw written samples (no decay).

    The similarity is the cosine between the query and the bucket's centroid, both projected on the table's
    own L hyperplanes (the memory's documented sketch of the cosine)."""
    out = []
    K, L = mem.num_tables, mem.bits
    planes = mem.planes.view(mem.dim, K, L)

    def code(x: torch.Tensor, k: int) -> int:
        return sum(int(float(x @ planes[:, k, b]) > 0) << b for b in range(L))

    for q, pb in zip(h, y_base.tolist()):
        reads = []
        for k in range(K):
            c = code(q, k)
            members = [(wh, wy, wp) for wh, wy, wp in writes if code(wh, k) == c]
            if not members:
                continue
            n = len(members)
            ybar = sum(m[1] for m in members) / n
            pbar = sum(m[2] for m in members) / n
            centroid = sum(m[0] for m in members) / n
            zq, zc = q @ planes[:, k, :], centroid @ planes[:, k, :]  # (L,) projections on table k
            sim = float(torch.dot(zq, zc) / (zq.norm().clamp(min=1e-8) * zc.norm().clamp(min=1e-8)))
            reads.append((sim, ybar, pbar))
        if not reads:
            out.append(pb)
            continue
        zs = [math.exp(s / mem.tau) for s, _, _ in reads]
        w = [z / sum(zs) for z in zs]
        ybar = sum(wi * r[1] for wi, r in zip(w, reads))
        pbar = sum(wi * r[2] for wi, r in zip(w, reads))
        err = mem.gamma * (ybar - pb) + (1 - mem.gamma) * (ybar - pbar)
        out.append(min(1.0, max(0.0, pb + mem.lam * err)))
    return out


@pytest.mark.parametrize("gamma, tau", [(1.0, 0.5), (0.3, 0.5), (0.3, math.inf)])
def test_estimate_matches_brute_force(gamma: float, tau: float) -> None:
    gen = torch.Generator().manual_seed(1)
    mem = ErrorCompensationMemory(dim=5, num_tables=3, bits=2, tau=tau, gamma=gamma, lam=0.7, seed=3)
    h = torch.randn(40, 5, generator=gen)
    y = (torch.rand(40, generator=gen) > 0.5).float()
    p = torch.rand(40, generator=gen)
    mem.write(h[:20], y[:20], p[:20])
    mem.write(h[20:30], y[20:30], p[20:30])
    writes = list(zip(h[:30], y[:30].tolist(), p[:30].tolist()))
    q, qp = torch.randn(15, 5, generator=gen), torch.rand(15, generator=gen)
    got = mem.estimate(q, qp).tolist()
    assert got == pytest.approx(_brute_force(mem, writes, q, qp), abs=1e-5)


def test_lambda_zero_returns_base_exactly() -> None:
    mem = ErrorCompensationMemory(dim=4, num_tables=4, bits=3, lam=0.0, seed=0)
    h, p = torch.randn(50, 4), torch.rand(50)
    mem.write(h, torch.ones(50), p)
    assert torch.equal(mem.estimate(h, p), p)


def test_no_evidence_returns_base_and_estimate_stays_in_unit_interval() -> None:
    mem = ErrorCompensationMemory(dim=3, num_tables=2, bits=4, lam=3.0, seed=0)
    h, p = torch.randn(20, 3), torch.rand(20)
    assert torch.equal(mem.estimate(h, p), p)
    mem.write(h, torch.ones(20), p)
    out = mem.estimate(h, p)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_size_does_not_grow_with_the_stream() -> None:
    mem = ErrorCompensationMemory(dim=8, num_tables=4, bits=6, decay=0.999, seed=0)
    before = mem.nbytes()
    for _ in range(30):
        mem.write(torch.randn(256, 8), torch.randint(0, 2, (256,)).float(), torch.rand(256))
    assert mem.nbytes() == before
    assert int(mem.clock) == 30 * 256


def test_decay_fades_old_evidence() -> None:
    h = torch.ones(1, 2)
    fresh = ErrorCompensationMemory(dim=2, num_tables=1, bits=1, lam=1.0, decay=0.5, shrinkage=1.0, seed=0)
    fresh.write(h, torch.ones(1), torch.zeros(1))
    strong = float(fresh.estimate(h, torch.zeros(1)))
    # the same evidence, then 10 writes elsewhere: its weight decays by 0.5**10, so shrinkage dominates
    other = -torch.ones(10, 2)
    fresh.write(other, torch.zeros(10), torch.zeros(10))
    assert float(fresh.estimate(h, torch.zeros(1))) < strong / 100


def test_state_round_trips_through_safetensors(tmp_path) -> None:
    mem = ErrorCompensationMemory(dim=6, num_tables=3, bits=5, decay=0.99, seed=7)
    mem.write(torch.randn(100, 6), torch.randint(0, 2, (100,)).float(), torch.rand(100))
    save_file(mem.state_dict(), str(tmp_path / "mem.safetensors"))
    twin = ErrorCompensationMemory(dim=6, num_tables=3, bits=5, decay=0.99, seed=99)  # other planes
    twin.load_state_dict(load_file(str(tmp_path / "mem.safetensors")))
    q, p = torch.randn(30, 6), torch.rand(30)
    assert torch.equal(twin.estimate(q, p), mem.estimate(q, p))
    with pytest.raises(ValueError, match="shape"):
        ErrorCompensationMemory(dim=6, num_tables=3, bits=4).load_state_dict(mem.state_dict())


def test_reset_and_rebuild() -> None:
    from online_models.models import ModelConfig, build_model

    model = build_model(ModelConfig(kind="deepfm", num_categorical=2, hash_buckets=10, num_numeric=1, seed=0))
    batches = [{"cat": torch.tensor([[1, 11], [2, 12]]), "num": torch.zeros(2, 1), "label": torch.tensor([1.0, 0.0])}]
    mem = ErrorCompensationMemory(dim=model.hidden_dim, num_tables=2, bits=3, seed=0)
    mem.write(torch.randn(5, model.hidden_dim), torch.ones(5), torch.rand(5))
    assert mem.rebuild(batches, model) == 2
    assert float(mem.stats[:, 0].sum()) == 2 * mem.num_tables
    assert model.training  # rebuild restores the mode it found
    mem.reset()
    assert float(mem.stats.abs().sum()) == 0 and int(mem.clock) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0}, "dim"),
        ({"dim": 4, "num_tables": 0}, "num_tables"),
        ({"dim": 4, "bits": 30}, "bits"),
        ({"dim": 4, "tau": 0}, "tau"),
        ({"dim": 4, "gamma": 1.5}, "gamma"),
        ({"dim": 4, "lam": -1}, "lam"),
        ({"dim": 4, "decay": 0}, "decay"),
        ({"dim": 4, "shrinkage": -1}, "shrinkage"),
    ],
)
def test_bad_parameters_are_named(kwargs, match) -> None:
    with pytest.raises(MemoryConfigError, match=match):
        ErrorCompensationMemory(**kwargs)


def test_bad_shapes_are_clear_errors() -> None:
    mem = ErrorCompensationMemory(dim=4)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        mem.estimate(torch.randn(3, 5), torch.rand(3))
    with pytest.raises(ValueError, match="same batch size"):
        mem.write(torch.randn(3, 4), torch.ones(2), torch.rand(3))


def test_forward_decay_survives_rescaling() -> None:
    # one bucket, one sample per write, decay 0.5: the decayed count is sum_k 0.5**k -> 2, even after the
    # forward-decay weights (2**t) pass the rescaling threshold many times
    mem = ErrorCompensationMemory(dim=2, num_tables=1, bits=1, decay=0.5, seed=0)
    h = torch.ones(1, 2)
    for t in range(300):
        mem.write(h, torch.tensor([float(t % 2)]), torch.zeros(1))
    r = mem.read(h)
    assert float(r["count"]) == pytest.approx(2.0, rel=1e-4)
    # the last sample (label 1) weighs 1, the one before (label 0) 0.5, ...: y_bar = 1/(1+0.5) * ... = 2/3
    assert float(r["y_bar"]) == pytest.approx(2 / 3, rel=1e-4)
    assert torch.isfinite(mem.table).all()


def test_eps_bounds_an_estimate_with_evidence_but_not_one_without() -> None:
    mem = ErrorCompensationMemory(dim=3, num_tables=2, bits=2, lam=5.0, gamma=1.0, eps=0.05, seed=0)
    h = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    p = torch.full((20,), 0.001)
    assert torch.equal(mem.estimate(h, p), p)  # no evidence: the base prediction, even below eps
    mem.write(h, torch.zeros(20), torch.full((20,), 0.9))
    out = mem.estimate(h, torch.full((20,), 0.9))  # all-negative neighbours, lam 5: pushed to the floor
    assert float(out.min()) == pytest.approx(0.05) and float(out.max()) <= 0.95


def test_step_is_estimate_then_write() -> None:
    gen = torch.Generator().manual_seed(2)
    h, y, p = (
        torch.randn(64, 6, generator=gen),
        (torch.rand(64, generator=gen) > 0.5).float(),
        torch.rand(64, generator=gen),
    )
    a = ErrorCompensationMemory(dim=6, num_tables=4, bits=3, lam=0.8, gamma=0.0, decay=0.99, shrinkage=2.0, seed=5)
    b = ErrorCompensationMemory(dim=6, num_tables=4, bits=3, lam=0.8, gamma=0.0, decay=0.99, shrinkage=2.0, seed=5)
    a.write(h[:32], y[:32], p[:32])
    b.write(h[:32], y[:32], p[:32])
    expected = b.estimate(h[32:], p[32:])
    b.write(h[32:], y[32:], p[32:])
    assert torch.equal(a.step(h[32:], p[32:], y[32:]), expected)
    assert torch.equal(a.table, b.table)


def test_row_width_does_not_depend_on_the_key_width() -> None:
    small, wide = (
        ErrorCompensationMemory(dim=4, num_tables=2, bits=5),
        ErrorCompensationMemory(dim=400, num_tables=2, bits=5),
    )
    assert small.table.shape == wide.table.shape == (2 * 2**5, 3 + 5)
    # uniform weights (tau = inf, the softmax's limit) need no similarity, so no projection sums either
    assert ErrorCompensationMemory(dim=400, num_tables=2, bits=5, tau=math.inf).table.shape == (2 * 2**5, 3)


def test_tiny_tau_does_not_underflow_to_no_evidence() -> None:
    mem = ErrorCompensationMemory(dim=4, num_tables=8, bits=2, tau=1e-3, gamma=1.0, lam=1.0, seed=0)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(50, 4, generator=gen)
    mem.write(h, torch.ones(50), torch.zeros(50))
    q = torch.randn(10, 4, generator=gen)
    assert torch.equal(mem.estimate(q, torch.zeros(10)), torch.ones(10))  # all neighbours positive


def _colliding_stream(n: int = 400, distinct: int = 12, dim: int = 6, seed: int = 0):
    """Keys drawn from a few prototypes, so many events of a batch share buckets (as one user's burst does)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(distinct, dim, generator=g)
    h = protos[torch.randint(0, distinct, (n,), generator=g)] + 0.05 * torch.randn(n, dim, generator=g)
    p = torch.rand(n, generator=g) * 0.8 + 0.1
    y = (torch.rand(n, generator=g) < p).float()
    return h, p, y


@pytest.mark.parametrize("decay", [1.0, 0.99])
@pytest.mark.parametrize("tau", [0.2, float("inf")])
@pytest.mark.parametrize("mode", ["event", "timestamp"])
def test_batched_per_event_step_equals_one_at_a_time(decay: float, tau: float, mode: str) -> None:
    from online_models.memory import write_groups

    kw = dict(dim=6, num_tables=8, bits=4, tau=tau, gamma=0.5, lam=0.8, shrinkage=2.0, eps=0.01, decay=decay, seed=1)
    rounds, seq = ErrorCompensationMemory(**kw), ErrorCompensationMemory(**kw)
    h, p, y = _colliding_stream()
    ts = torch.randint(0, 3, (len(p),), generator=torch.Generator().manual_seed(5)).cumsum(0).numpy()
    for lo in range(0, len(p), 128):  # several batches: state carries over between them
        sl = slice(lo, lo + 128)
        groups = write_groups(ts[sl], mode)
        out = rounds.step(h[sl], p[sl], y[sl], groups)  # step() takes the batched path for several groups
        ref = seq.step_sequential(h[sl], p[sl], y[sl], groups)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rounds.table, seq.table, rtol=1e-6, atol=1e-6)
    assert int(rounds.clock) == int(seq.clock) == len(p)


def test_per_event_step_rejects_ragged_groups() -> None:
    mem = ErrorCompensationMemory(dim=2, num_tables=2, bits=2)
    h = torch.randn(4, 2)
    with pytest.raises(ValueError, match="consecutive"):
        mem.step_per_event(mem.hash(h), torch.full((4,), 0.5), torch.ones(4), [(0, 2), (3, 4)])


def test_per_event_step_without_groups_is_one_group_per_event() -> None:
    kw = dict(dim=6, num_tables=8, bits=4, tau=0.2, gamma=0.0, lam=1.0, decay=0.999, seed=2)
    a, b = ErrorCompensationMemory(**kw), ErrorCompensationMemory(**kw)
    h, p, y = _colliding_stream(200)
    torch.testing.assert_close(a.step_per_event(a.hash(h), p, y), b.step_sequential(h, p, y), rtol=1e-6, atol=1e-7)


def test_per_event_step_survives_the_rescale() -> None:
    kw = dict(dim=6, num_tables=4, bits=3, tau=0.2, gamma=1.0, lam=1.0, shrinkage=1.0, decay=0.9, seed=0)
    a, b = ErrorCompensationMemory(**kw), ErrorCompensationMemory(**kw)
    h, p, y = _colliding_stream(600)
    for lo in range(0, 600, 50):  # 0.9 ** -400 > 1e18: rescales happen along the way
        sl = slice(lo, lo + 50)
        torch.testing.assert_close(
            a.step_per_event(a.hash(h[sl]), p[sl], y[sl]), b.step_sequential(h[sl], p[sl], y[sl]), rtol=1e-5, atol=1e-6
        )
    assert int(a.base) > 0 and int(b.base) > 0


def test_bfloat16_hashing_is_opt_in_and_close() -> None:
    h = torch.randn(256, 40, generator=torch.Generator().manual_seed(0))
    a = ErrorCompensationMemory(dim=40, num_tables=8, bits=10, seed=3)
    b = ErrorCompensationMemory(dim=40, num_tables=8, bits=10, seed=3, precision="bfloat16")
    assert a.config.precision == "float32" and b.config.precision == "bfloat16"
    agree = (a.hash(h).index == b.hash(h).index).float().mean()
    assert agree > 0.9  # only keys within bf16 rounding of a plane move
    torch.testing.assert_close(a.hash(h).proj, b.hash(h).proj, rtol=0.05, atol=0.05)
    b.load_state_dict(a.state_dict())  # planes come from the state: bf16 copy follows
    assert torch.equal(b._planes_bf16, a.planes.bfloat16())
    with pytest.raises(ValueError, match="precision"):
        ErrorCompensationMemory(dim=4, precision="int8")


def _keys(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Keys of mixed magnitudes, with exact zeros and entries far below the row's largest (the quantiser's worst)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g) * torch.logspace(-6, 3, n).unsqueeze(1)
    h[:, ::3] = torch.relu(h[:, ::3])  # a ReLU layer's zeros
    h[1::7, : dim // 2] *= 1e-5
    h[0] = 0.0
    return h


@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("n", [1, 5, 33, 600])
def test_hash_buckets_are_the_float64_reference(n: int, int8: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # every code bit is the sign of the exact dot product of the key with its plane, whatever path hashes the batch
    # (small: one float64 matmul; large: three int8 matmuls with a float64 fix-up near zero, or one float64 matmul
    # where int8 is slower on this CPU; fallback: float32). Both large paths run here, whichever this CPU prefers.
    monkeypatch.setattr(memory_mod, "INT8_MATMUL", int8)
    mem = ErrorCompensationMemory(dim=416, num_tables=32, bits=10, seed=7)
    h = _keys(n, 416)
    got = mem.hash(h)
    ref = reference_hash(mem, h)
    agree = (got.index == ref).float().mean()
    if memory_mod.USE_KERNELS:
        assert torch.equal(got.index, ref)
    else:  # the float32 matmul: a sign flips only within float32 rounding of a plane
        assert agree > 0.999
    proj64 = (h.double() @ mem.planes.double()).view(n, 32, 10)
    torch.testing.assert_close(got.proj.double(), proj64, rtol=1e-4, atol=1e-5 * float(h.abs().max()) + 1e-30)


def test_hash_of_a_non_finite_key_does_not_break_the_batch() -> None:
    mem = ErrorCompensationMemory(dim=40, num_tables=8, bits=6, seed=1)
    h = _keys(100, 40)
    h[3, 5] = float("nan")
    h[4, 0] = float("inf")
    got = mem.hash(h)
    keep = torch.ones(100, dtype=torch.bool)
    keep[3:5] = False
    assert torch.equal(got.index[keep], reference_hash(mem, h)[keep])
    assert bool(((got.index >= 0) & (got.index < 8 * 64)).all())


def test_planes_are_int8_exact_and_a_state_with_other_planes_still_hashes() -> None:
    mem = ErrorCompensationMemory(dim=30, num_tables=4, bits=8, seed=2)
    ints = mem.planes * 32
    assert torch.equal(ints, ints.round()) and float(ints.abs().max()) <= 127
    assert 0.9 < float(mem.planes.std()) < 1.1  # still unit-Gaussian hyperplanes
    # a state saved with unrounded planes: no int8 path, the hash is still that of its planes
    state = mem.state_dict()
    state["planes"] = torch.randn(30, 32, generator=torch.Generator().manual_seed(0))
    mem.load_state_dict(state)
    assert mem._planes_i8 is None
    h = _keys(200, 30)
    agree = (mem.hash(h).index == reference_hash(mem, h)).float().mean()
    assert agree == 1.0 if memory_mod.USE_KERNELS else agree > 0.999


@pytest.mark.parametrize("decay", [1.0, 0.995, 0.9])
@pytest.mark.parametrize("tau", [0.2, math.inf])
def test_compiled_estimate_and_write_equal_the_tensor_reference(monkeypatch, decay: float, tau: float) -> None:
    kw = dict(dim=6, num_tables=8, bits=4, tau=tau, gamma=0.3, lam=0.8, shrinkage=2.0, eps=0.01, decay=decay, seed=1)
    a, b = ErrorCompensationMemory(**kw), ErrorCompensationMemory(**kw)
    h, p, y = _colliding_stream(900)
    for lo in range(0, 900, 90):  # decay 0.9: 0.9 ** -400 > 1e18, so rescales happen along the way
        sl = slice(lo, lo + 90)
        ha, hb = a.hash(h[sl]), b.hash(h[sl])
        monkeypatch.setattr(memory_mod, "USE_KERNELS", False)
        ref = b.estimate(None, p[sl], hb)
        b.write(h[sl], y[sl], p[sl], hb, each=lo % 180 == 0)
        monkeypatch.setattr(memory_mod, "USE_KERNELS", memory_mod.numba is not None)
        got = a.estimate(None, p[sl], ha)
        a.write(h[sl], y[sl], p[sl], ha, each=lo % 180 == 0)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    scale = a.decay ** a._age(), b.decay ** b._age()  # forward-decayed tables: compare what they stand for
    torch.testing.assert_close(a.table * scale[0], b.table * scale[1], rtol=1e-4, atol=1e-5)
    assert int(a.clock) == int(b.clock) == 900
