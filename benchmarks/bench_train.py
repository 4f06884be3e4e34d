"""Benchmark: test-then-train throughput of the torch CTR models (sparse id updates) against River's logistic
regression, on the same encoded ML-100K stream, in the same run.

For every (model, batch size, torch threads): the learner test-then-trains the stream in mini-batches (one pass
scores the batch with the pre-update weights, then one optimizer step), and River LR test-then-trains the same
events one sample at a time. The two are interleaved chunk by chunk (``--chunk`` events each), so both see the
same machine load (the box is shared), and the ratio torch/River is the figure that counts. The learner is the
evaluation's (``reloop evaluate``: Adagrad lr 0.1, embedding L2 1e-4, dropout 0.1, the 4 CTR features).

Targets (issue 15): DCNv2 at batch 16 >= 0.1x River LR, at batch 256 >= 0.6x.

    python benchmarks/bench_train.py [--events 20000] [--batch-sizes 16 256] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import report
from online_models.learner import LearnerConfig, OnlineLearner, iter_batches
from online_models.models import build_model
from online_models.river_baselines import RiverBaseline
from reloop.evaluate import EvaluationConfig, _model_config, prepare_stream

TARGETS = {16: 0.1, 256: 0.6}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=20_000, help="first events of ML-100K (time order)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads to compare")
    ap.add_argument("--models", nargs="+", default=["dcnv2", "deepfm", "lr"])
    ap.add_argument("--chunk", type=int, default=1024, help="events per interleaved chunk")
    args = ap.parse_args(argv)
    threads0 = torch.get_num_threads()

    ev = EvaluationConfig(limit=args.events, slots=1)
    stream = prepare_stream(ev)
    full = stream.slice(0, stream.n)
    rows = []
    for kind in args.models:
        for bs in args.batch_sizes:
            for threads in args.threads:
                torch.set_num_threads(threads)
                learner = OnlineLearner(
                    build_model(_model_config(EvaluationConfig(model=kind), stream)),
                    LearnerConfig(
                        lr=ev.lr,
                        weight_decay=ev.weight_decay,
                        optimizer=ev.optimizer,
                        embedding_lr=ev.embedding_lr,
                        seed=0,
                    ),
                )
                river = RiverBaseline("lr", lr=ev.river_lr, seed=0)
                chunk = max(bs, args.chunk // bs * bs)
                t_torch = t_river = 0.0
                for lo in range(0, stream.n, chunk):
                    part = {k: v[lo : lo + chunk] for k, v in full.items()}
                    t0 = time.perf_counter()
                    for b in iter_batches(part, bs):
                        learner.test_then_train(b)
                    t1 = time.perf_counter()
                    river.test_then_train(part)  # one sample at a time inside, as River works
                    t2 = time.perf_counter()
                    t_torch, t_river = t_torch + t1 - t0, t_river + t2 - t1
                torch_sps, river_sps = stream.n / t_torch, stream.n / t_river
                ratio = torch_sps / river_sps
                row = {
                    "model": kind,
                    "batch": bs,
                    "threads": threads,
                    "torch_samples_per_s": torch_sps,
                    "river_lr_samples_per_s": river_sps,
                    "x_river_lr": ratio,
                }
                if kind == "dcnv2" and bs in TARGETS:
                    row["target"] = TARGETS[bs]
                    row["met"] = ratio >= TARGETS[bs]
                rows.append(row)
    torch.set_num_threads(threads0)
    print(
        f"test-then-train on {stream.n:,} ML-100K events; torch in mini-batches (sparse id rows, Adagrad), River LR "
        f"one sample at a time, interleaved in chunks of ~{args.chunk} events (same load)\n"
    )
    report("bench_train", rows, {"events": stream.n, "torch": torch.__version__, "targets_dcnv2_x_river_lr": TARGETS})
    return rows


if __name__ == "__main__":
    main()
