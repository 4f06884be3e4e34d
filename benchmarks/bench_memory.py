"""Benchmark: the error-compensation memory's cost next to the model it corrects, and test-then-train
throughput of the torch models next to River's logistic regression, on the same ML-100K stream, same run.

1. Per batch of real encoded events (``--batch-sizes``: one request, the live loop's 512): the model's forward
   pass (eval, no grad) vs building the memory key + the memory's ``step`` (estimate, then write) of that batch.
   Target: memory <= 10% of the forward pass. Not met for the evaluation's small models, and it cannot be with
   K SimHash tables: hashing alone is D*K*L multiply-adds per sample (40*32*10 = 12.8K for the hidden+user key)
   against ~8K for the whole small DCNv2; at batch 1 both sides are per-op overhead. The paper-size DCNv2 is the
   row where the ratio means something (tau = inf, K = 8: ~30% at 512 rows).
2. Test-then-train samples/s over the first ``--events`` events: torch LR / DeepFM / DCNv2
   (mini-batches) vs River LR and FM (one sample at a time, as River works).
3. The memory's size before and after the stream (constant).
4. ``prod``: the memory on a production-size model (:func:`online_models.models.criteo_like_config`: 13 numeric +
   26 categorical fields, embedding 16, DCNv2 3 cross layers + MLP 3x400) fed the project's synthetic batches of
   that shape (:func:`online_models.models.synthetic_batch`), at batches 1, 512 and 4096, with the served memory
   settings (``SERVING_MEMORY``: K, L, tau, key): forward pass vs key + hash + estimate + write (batch semantics,
   hashed once) and vs the per-event step. Target: <= 10% of the forward pass at batch 512.
5. Serving with per-event memory semantics (``--serve-events`` events, batches of ``--serve-batch``, the served
   memory ``SERVING_MEMORY``): forward + key + the batched per-event step (``step_per_event``) against the same
   with the one-event-at-a-time reference loop (``step_sequential``) and with the whole batch written at once
   (``batch`` semantics, the old fast path). Also the largest difference between per-event and sequential
   predictions (they must agree), and how many conflict-free rounds a batch would need (why the batched step
   does not run in rounds: with numba it is the sequential loop compiled, without it in-bucket prefix sums).
   Target: >= 50k events/s per-event. ``--no-kernels`` runs the memory's torch paths (no numba), for comparison.

Both sides run single-threaded (``torch.set_num_threads(1)``; River is pure Python), so ratios compare
like with like. Prints a table and writes ``benchmarks/results/bench_memory.json``.

    python benchmarks/bench_memory.py [--events 20000] [--batch-size 256] [--batch-sizes 1 512] [--repeats 30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

import online_models.memory as memory_mod
from online_models.learner import LearnerConfig, OnlineLearner, iter_batches
from online_models.memory import SERVING_MEMORY, ErrorCompensationMemory, reference_hash
from online_models.models import (
    ModelConfig,
    build_model,
    criteo_like_config,
    memory_key,
    memory_key_dim,
    synthetic_batch,
)
from online_models.river_baselines import RiverBaseline
from reloop.evaluate import EvaluationConfig, prepare_stream

KEY = SERVING_MEMORY["key"]  # the evaluation's and serving's memory key


def _paired_median_times(fa, fb, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fa`` and ``fb``, interleaved so both see the same machine load."""
    fa(), fb()  # warm
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


# (name, model overrides): the small models of the evaluation, and a DCNv2 of the size of its paper's
# public-data setups (larger embeddings, 3 cross layers, wide MLP), where the forward pass is not all overhead
MODELS = [
    ("deepfm", {"kind": "deepfm"}),
    ("dcnv2", {"kind": "dcnv2"}),
    ("dcnv2-large", {"kind": "dcnv2", "embedding_dim": 16, "hidden_sizes": (400, 400, 400), "cross_layers": 3}),
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20_000, help="events of ML-100K used (time order)")
    ap.add_argument("--batch-size", type=int, default=256, help="mini-batch of the test-then-train throughput")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 512], help="batches of the memory-cost rows")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--serve-events", type=int, default=20_000)
    ap.add_argument("--serve-batch", type=int, default=512)
    ap.add_argument("--prod-batch-sizes", type=int, nargs="+", default=[1, 512, 4096])
    ap.add_argument("--sections", nargs="+", default=["cost", "train", "size", "prod", "serve"])
    ap.add_argument("--out", default="benchmarks/results/bench_memory.json")
    ap.add_argument(
        "--no-kernels", action="store_true", help="run the memory's torch paths (the fallback without numba)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.no_kernels:
        memory_mod.USE_KERNELS = False
    print(f"memory kernels: {'compiled (numba)' if memory_mod.USE_KERNELS else 'torch'}")

    stream = prepare_stream(EvaluationConfig(limit=args.events, slots=1, warmup=0.5))
    enc = stream.encoder.config

    def model_cfg(kind: str, **kw) -> ModelConfig:
        return ModelConfig(
            kind=kind,
            num_categorical=len(enc.categorical_fields),
            hash_buckets=enc.hash_buckets,
            num_numeric=len(enc.numeric_fields),
            seed=0,
            **kw,
        )

    # 1) memory vs forward pass, per batch, at the batch sizes of the served paths: one request (jobs.scoring) and
    #    the live loop's batches (reloop.live, 512); K, L, tau as in the validation grid (tau = inf: uniform weights)
    cost_rows = []
    for bs in args.batch_sizes if "cost" in args.sections else []:
        batch = stream.slice(0, bs)
        for name, overrides in MODELS:
            model = build_model(model_cfg(**overrides)).eval()
            with torch.no_grad():
                logits, hidden = model(batch)
            p, y = torch.sigmoid(logits), batch["label"]

            def forward(model=model, batch=batch):
                with torch.no_grad():
                    model(batch)

            for k, bits, tau in ((8, 10, 0.2), (32, 10, 0.2), (8, 10, math.inf), (32, 10, math.inf)):
                mem = ErrorCompensationMemory(
                    dim=memory_key_dim(model, KEY),
                    num_tables=k,
                    bits=bits,
                    tau=tau,
                    gamma=0.0,
                    lam=1.0,
                    shrinkage=10.0,
                    eps=0.02,
                    decay=0.999,
                    seed=0,
                )
                mem.rebuild(
                    iter_batches(stream.slice(0, 5000), 256),
                    model,
                    key_fn=lambda b, h, m=model: memory_key(m, b, h, KEY),
                )

                def mem_step(mem=mem, hidden=hidden, model=model, batch=batch, p=p, y=y):
                    key = memory_key(model, batch, hidden, KEY)  # building the key is part of the memory's cost
                    mem.step(key, p, y)

                t_fwd, t_mem = _paired_median_times(forward, mem_step, args.repeats)
                cost_rows.append(
                    {
                        "model": name,
                        "K": k,
                        "L": bits,
                        "tau": tau,
                        "batch": bs,
                        "forward_ms": t_fwd * 1e3,
                        "memory_ms": t_mem * 1e3,
                        "ratio": t_mem / t_fwd,
                    }
                )

    # 2) test-then-train throughput on the same stream
    full = stream.slice(0, stream.n)
    tput = {}
    ev = EvaluationConfig()
    for kind in ("lr", "deepfm", "dcnv2") if "train" in args.sections else ():
        for bs in sorted({args.batch_size, ev.batch_size}, reverse=True):  # and the evaluation's mini-batch
            learner = OnlineLearner(
                build_model(model_cfg(kind)), LearnerConfig(lr=ev.lr, optimizer=ev.optimizer, seed=0)
            )
            t0 = time.perf_counter()
            for b in iter_batches(full, bs):
                learner.test_then_train(b)
            tput[f"torch_{kind}" + ("" if bs == args.batch_size else f"_batch{bs}")] = stream.n / (
                time.perf_counter() - t0
            )
    fm_numeric = tuple(enc.numeric_fields.index(c) for c in EvaluationConfig().river_fm_numeric)
    for kind in ("lr", "fm") if "train" in args.sections else ():
        river = RiverBaseline(kind, seed=0, numeric=fm_numeric if kind == "fm" else None)
        t0 = time.perf_counter()
        for b in iter_batches(full, args.batch_size):
            river.test_then_train(b)
        tput[f"river_{kind}"] = stream.n / (time.perf_counter() - t0)

    # 3) constant size
    mem = ErrorCompensationMemory(dim=32, num_tables=16, bits=12, decay=0.9999, seed=0)
    size_before = mem.nbytes()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        mem.write(
            torch.randn(args.batch_size, 32, generator=g), torch.ones(args.batch_size), torch.rand(args.batch_size)
        )
    size_after = mem.nbytes()

    print(
        f"\nmemory key+estimate+write ({KEY} key, decay on) vs model forward "
        f"(median of {args.repeats} interleaved pairs, 1 thread)"
    )
    print(
        f"{'model':12s} {'batch':>5s} {'K':>3s} {'L':>3s} {'tau':>4s} {'forward ms':>11s} {'memory ms':>10s} {'ratio':>7s}"
    )
    for r in cost_rows:
        print(
            f"{r['model']:12s} {r['batch']:5d} {r['K']:3d} {r['L']:3d} {r['tau']:4.1f} {r['forward_ms']:11.3f} "
            f"{r['memory_ms']:10.3f} {r['ratio']:7.1%}"
        )
    serve_rows = (
        serving_rows(stream, model_cfg, args.serve_events, args.serve_batch) if "serve" in args.sections else []
    )
    ref = tput.get("river_lr", float("nan"))
    print(
        f"\ntest-then-train on {stream.n:,} ML-100K events (reference: River LR, same run; "
        f"torch in mini-batches of {args.batch_size} (_batchN: of N), River one sample at a time; River FM: ids + 4 CTRs)"
    )
    print(f"{'learner':14s} {'samples/s':>12s} {'x River LR':>11s}")
    for name, v in tput.items():
        print(f"{name:14s} {v:12,.0f} {v / ref:11.2f}")
    print(
        f"\nmemory state {size_before:,} bytes before and {size_after:,} bytes after "
        f"{200 * args.batch_size:,} writes (K=16, L=12, dim=32)"
    )

    prod = prod_rows(args.prod_batch_sizes, args.repeats) if "prod" in args.sections else []
    if prod:
        print(
            f"\nproduction-size DCNv2 (criteo_like_config), served memory K={SERVING_MEMORY['num_tables']} "
            f"L={SERVING_MEMORY['bits']} tau={SERVING_MEMORY['tau']} key={SERVING_MEMORY['key']} (median of "
            f"{args.repeats} interleaved pairs, 1 thread)"
        )
        for r in prod:
            print(
                f"{r['hash_precision']:8s} batch {r['batch']:5d}  forward {r['forward_ms']:9.3f} ms  memory {r['memory_ms']:8.3f} ms "
                f"({r['ratio']:6.1%})  per-event memory {r['per_event_memory_ms']:8.3f} ms ({r['per_event_ratio']:6.1%})"
                f"  = key {r['key_ms']:6.3f} + hash {r['hash_ms']:6.3f} + estimate {r['estimate_ms']:6.3f} + write "
                f"{r['write_ms']:6.3f} ms  buckets = float64 reference {r['bucket_agreement_vs_float64']:.5f}"
            )
    if serve_rows:
        print(
            f"\nserving: forward + key + memory step, batches of {args.serve_batch}, served memory "
            f"K={SERVING_MEMORY['num_tables']} L={SERVING_MEMORY['bits']} tau={SERVING_MEMORY['tau']} (1 thread)"
        )
        for r in serve_rows:
            print(
                f"{r['semantics']:28s} {r['events_per_s']:12,.0f} events/s  memory {r['memory_ms_per_batch']:8.3f} ms/batch"
                + (
                    f"  max |diff| vs sequential {r['max_abs_diff_vs_sequential']:.2e}"
                    if "max_abs_diff_vs_sequential" in r
                    else ""
                )
                + (
                    f"  rounds/batch {r['conflict_free_rounds_per_batch']:.0f}"
                    if "conflict_free_rounds_per_batch" in r
                    else ""
                )
            )
    result = {
        "benchmark": "bench_memory",
        "events": stream.n,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": 1,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "memory_vs_forward": cost_rows,
        "test_then_train_samples_per_s": tput,
        "throughput_vs_river_lr": {k: v / ref for k, v in tput.items()},
        "memory_bytes": {"before": size_before, "after": size_after},
        "serving": serve_rows,
        "production_size": prod,
        "target": {"memory_vs_forward_max_ratio": 0.10},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


def prod_rows(batch_sizes: list[int], repeats: int) -> list[dict]:
    """Memory vs forward pass on the production-size DCNv2, served memory settings."""
    cfg = criteo_like_config()
    model = build_model(cfg).eval()
    key_kind = SERVING_MEMORY["key"]
    params = {k: v for k, v in SERVING_MEMORY.items() if k != "key"}
    rows = []
    for precision, bs in itertools.product(("float32", "bfloat16"), batch_sizes):
        mem = ErrorCompensationMemory(dim=memory_key_dim(model, key_kind), **params, precision=precision)
        mem.rebuild(
            iter_batches(synthetic_batch(cfg, 20_000, seed=1), 2048),
            model,
            key_fn=lambda b, h: memory_key(model, b, h, key_kind),
        )
        batch = synthetic_batch(cfg, bs, seed=2)
        with torch.no_grad():
            logits, hidden = model(batch)
        p, y = torch.sigmoid(logits), batch["label"]
        state = mem.state_dict()

        def forward():
            with torch.no_grad():
                model(batch)

        def memory():
            key = memory_key(model, batch, hidden, key_kind)
            hashed = mem.hash(key)
            mem.estimate(key, p, hashed)
            mem.write(key, y, p, hashed)

        def per_event():
            key = memory_key(model, batch, hidden, key_kind)
            mem.step_per_event(mem.hash(key), p, y)

        def key_hash():
            mem.hash(memory_key(model, batch, hidden, key_kind))

        key = memory_key(model, batch, hidden, key_kind)
        hashed = mem.hash(key)

        def key_only():
            memory_key(model, batch, hidden, key_kind)

        def estimate_only():
            mem.estimate(key, p, hashed)

        def write_only():
            mem.write(key, y, p, hashed)

        t_fwd, t_mem = _paired_median_times(forward, memory, repeats)
        _, t_pe = _paired_median_times(forward, per_event, repeats)
        _, t_kh = _paired_median_times(forward, key_hash, repeats)
        _, t_key = _paired_median_times(forward, key_only, repeats)
        _, t_est = _paired_median_times(forward, estimate_only, repeats)
        _, t_wr = _paired_median_times(forward, write_only, repeats)
        mem.load_state_dict(state)
        # buckets against the float64 reference (the float32 semantics): 1.0 = every bucket the same
        agreement = float((mem.hash(key).index == reference_hash(mem, key)).float().mean())
        rows.append(
            {
                "model": "criteo-like dcnv2",
                "hash_precision": precision,
                "batch": bs,
                "forward_ms": t_fwd * 1e3,
                "memory_ms": t_mem * 1e3,
                "ratio": t_mem / t_fwd,
                "per_event_memory_ms": t_pe * 1e3,
                "per_event_ratio": t_pe / t_fwd,
                "key_hash_ms": t_kh * 1e3,
                "key_ms": t_key * 1e3,
                "hash_ms": max(t_kh - t_key, 0.0) * 1e3,
                "estimate_ms": t_est * 1e3,
                "write_ms": t_wr * 1e3,
                "bucket_agreement_vs_float64": agreement,
                "compiled_kernels": memory_mod.USE_KERNELS,
                "target_ratio_at_512": 0.10,
            }
        )
    return rows


def memory_rounds(index: torch.Tensor) -> int:
    """How many rounds of events that share no bucket with an earlier event of the round a batch needs.

    An event's round is one more than the latest round of the earlier events it shares a bucket with (in any
    table): the schedule that writes each round before the next is read. Kept here as a diagnostic only.
    """
    last: dict[int, int] = {}
    depth = 0
    for row in index.tolist():
        r = 1 + max((last.get(bucket, -1) for bucket in row), default=-1)
        for bucket in row:
            last[bucket] = r
        depth = max(depth, r + 1)
    return depth


def serving_rows(stream, model_cfg, events: int, batch_size: int) -> list[dict]:
    """Events/s of forward + key + memory step under three write semantics, on the same batches."""
    n = min(events, stream.n)
    full = stream.slice(0, n)
    model = build_model(model_cfg("dcnv2")).eval()
    params = {k: v for k, v in SERVING_MEMORY.items() if k != "key"}
    key_kind = SERVING_MEMORY["key"]
    batches = []
    t_fwd = 0.0
    for b in iter_batches(full, batch_size):
        t0 = time.perf_counter()
        with torch.no_grad():
            logits, hidden = model(b)
        key = memory_key(model, b, hidden, key_kind)
        t_fwd += time.perf_counter() - t0
        batches.append((key, torch.sigmoid(logits), b["label"]))
    rows, outs = [], {}
    for name in ("per-event (batched)", "per-event (sequential ref)", "batch at once"):
        mem = ErrorCompensationMemory(dim=memory_key_dim(model, key_kind), **params)
        t_mem, out, rounds = 0.0, [], []
        for key, p, y in batches:
            t0 = time.perf_counter()
            if name == "per-event (batched)":
                out.append(mem.step_per_event(mem.hash(key), p, y))
            elif name == "per-event (sequential ref)":
                out.append(mem.step_sequential(key, p, y))
            else:
                out.append(mem.step(key, p, y))
            t_mem += time.perf_counter() - t0
            if name == "per-event (batched)" and len(rounds) < 5:
                rounds.append(memory_rounds(mem.hash(key).index))
        outs[name] = torch.cat(out)
        row = {
            "semantics": name,
            "events": n,
            "batch": batch_size,
            "events_per_s": n / (t_fwd + t_mem),
            "memory_ms_per_batch": t_mem / len(batches) * 1e3,
            "forward_key_ms_per_batch": t_fwd / len(batches) * 1e3,
        }
        if rounds:
            row["conflict_free_rounds_per_batch"] = sum(rounds) / len(rounds)
        rows.append(row)
    ref = outs["per-event (sequential ref)"]
    for row in rows:
        row["max_abs_diff_vs_sequential"] = float((outs[row["semantics"]] - ref).abs().max())
        row["target_events_per_s"] = 50_000 if row["semantics"] == "per-event (batched)" else None
    return rows


if __name__ == "__main__":
    main()
