"""Learning under delayed feedback on a replayed dataset: wait-for-the-window vs fake-negative corrections,
and the label-free estimate (CBPE) against the realised metric.

``python -m reloop.evaluate_delayed --label-delay exp:20m --attribution-window 1h [--out DIR]``

Protocol (chronological, every impression predicted before anything learnt from it):

1. The dataset becomes impressions + clicks delayed by ``--label-delay`` (seeded,
   :func:`reloop.synthetic.label_delay`), joined by the feature job's own join
   (:func:`pipelines.join.join_batch`) with the attribution window: one example per
   impression, ``label`` (click within the window), ``label_ts`` (when it became known)
   and features strictly before the impression (clicks counted by arrival time).
2. Every variant starts from the same untrained model and sees impressions in time
   order in mini-batches: it predicts the batch, then learns every training sample
   whose time has come before the next batch. What differs is *when* which label reaches it:

   - ``no-delay``: each example with its final label at its impression time (the
     reference: labels as if known at once; features of the immediate-feedback join);
   - ``wait``: each example at ``label_ts`` (positives when the click arrives, negatives
     when the window closes): no fake negatives, but an hour late;
   - ``fnw`` / ``fnc``: every impression at once as a negative, and a positive copy when
     its click arrives (fake negatives), corrected by FNW weights or FNC calibration
     (:mod:`online_models.delayed`, Ktena et al. 2019);
   - ``+memory``: the same model's predictions corrected by the error-compensation memory,
     which is written when the label arrives, keyed by the **hidden vector stored at
     impression time** (with the base prediction made then), not recomputed.
3. Metrics (AUC, logloss) over the impressions after a burn-in (``--burn-in``), against
   the attributed label. ``fake_negative_share``: of the samples learnt, the share learnt
   as negative whose impression has a click in the data (within the window or later).
4. CBPE: the test impressions in chunks; at the time the chunk's last impression is
   served, the ``wait`` model's predictions of the chunk, calibrated (Platt) on the latest
   labelled history known then, give the expected AUC / logloss without any of the
   chunk's labels; the realised metric is computed once they are in. Reported per chunk
   with the mean absolute gap, and the monitor's alarms (band from the first chunks).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from online_models.cbpe import estimate_over_time
from online_models.delayed import fnc_calibrate, learn_weighted
from online_models.encoding import EncoderConfig, FeatureEncoder
from online_models.learner import LearnerConfig, OnlineLearner
from online_models.memory import ErrorCompensationMemory, MemoryConfig
from online_models.metrics import auc, logloss
from online_models.models import build_model, memory_key, memory_key_dim, model_config_for
from online_models.settings import MODEL_ARCH, SERVING_MEMORY
from pipelines.join import FEEDBACK_SCHEMA, JoinConfig, JoinState, join_batch
from reloop.datasets import load_dataset
from reloop.synthetic import label_delay, parse_duration_ms

VARIANTS = ("no-delay", "no-delay+memory", "wait", "wait+memory", "fnw", "fnc")
NUMERIC = ("user_ctr_1d", "user_ctr_all", "item_ctr_1d", "item_ctr_all")


@dataclass(frozen=True)
class DelayedEvalConfig:
    dataset: str = "movielens-100k"
    label_delay: str = "exp:20m"
    window_ms: int = 3_600_000
    seed: int = 0
    limit: int | None = None
    burn_in: float = 0.3
    batch_size: int = 64
    model: str = "dcnv2"
    lr: float = 0.1
    optimizer: str = "adagrad"
    hash_buckets: int = MODEL_ARCH["hash_buckets"]
    # the memory settings `reloop evaluate` validated for serving (its validation slot, no delay): not tuned here
    memory_key: str = SERVING_MEMORY["key"]
    memory: MemoryConfig = MemoryConfig(dim=1, **{k: v for k, v in SERVING_MEMORY.items() if k != "key"})
    chunk: int = 2000
    calibration_window: int = 5000
    reference_chunks: int = 5
    variants: tuple[str, ...] = VARIANTS


def joined_examples(cfg: DelayedEvalConfig) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """``(delayed examples, no-delay examples, true labels)``, both example tables in impression order."""

    t = load_dataset(cfg.dataset, limit=cfg.limit)
    imps, fb = label_delay(t, cfg.label_delay, cfg.seed)
    jc = JoinConfig(window_ms=cfg.window_ms)

    def run(imps: pa.Table, fb: pa.Table) -> pa.Table:
        n, m = imps.num_rows, fb.num_rows
        it = imps.append_column("kafka_partition", pa.array(np.zeros(n, np.int32))).append_column(
            "kafka_offset", pa.array(np.arange(n), pa.int64())
        )
        ft = pa.table(
            {
                "impression_id": fb["impression_id"],
                "ts": fb["ts"],
                "kind": fb["kind"],
                "value": pa.nulls(m, pa.float64()),
                "kafka_partition": pa.array(np.full(m, 1 << 20, np.int32)),
                "kafka_offset": pa.array(np.arange(m), pa.int64()),
                "key": pa.nulls(m, pa.binary()),
                "raw": pa.nulls(m, pa.binary()),
            },
            schema=FEEDBACK_SCHEMA,
        )
        res = join_batch(it, ft, JoinState.empty(), jc)
        st = res.state  # the end of the stream: every window closes
        st.partition_ts = {p: int(t["ts"].to_numpy().max()) + 2 * cfg.window_ms for p in st.partition_ts}
        tail = join_batch(it.slice(0, 0), ft.slice(0, 0), st, jc)
        ex = pa.concat_tables([res.examples, tail.examples], promote_options="permissive")
        return ex.sort_by([("ts", "ascending"), ("kafka_offset", "ascending")])

    delayed = run(imps, fb)
    pos = delayed.filter(pa.compute.equal(delayed["label"], 1))
    immediate = pa.table(
        {"impression_id": pos["impression_id"], "ts": pos["ts"], "kind": pa.array(["click"] * pos.num_rows)}
    )
    nodelay = run(imps, immediate.sort_by("ts"))
    truth = dict(zip(t["event_id"].to_pylist(), t["label"].to_pylist()))
    y_true = np.array([truth[i] for i in delayed["impression_id"].to_pylist()], np.int8)
    return delayed, nodelay, y_true


def _learner(cfg: DelayedEvalConfig) -> OnlineLearner:
    torch.manual_seed(cfg.seed)
    # the encoder's fields (what `reloop evaluate` validated: ids and the four CTRs), the shared architecture
    fields = EncoderConfig(numeric_fields=NUMERIC, hash_buckets=cfg.hash_buckets)
    mc = model_config_for(cfg.model, fields, weight_decay=1e-4, seed=cfg.seed)
    return OnlineLearner(
        build_model(mc), LearnerConfig(lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=1e-4, seed=cfg.seed)
    )


def simulate(
    cfg: DelayedEvalConfig,
    batch: dict[str, torch.Tensor],
    ts: np.ndarray,
    label: np.ndarray,
    label_ts: np.ndarray,
    y_true: np.ndarray,
    mode: str,
    with_memory: bool,
) -> dict[str, Any]:
    """One variant over the stream; returns predictions at impression time and training bookkeeping."""
    n = len(ts)
    learner = _learner(cfg)
    correction = mode if mode in ("fnw", "fnc") else None
    # the training samples: (time, impression index, label) in the order they become available
    if mode == "no-delay":
        when, idx, lab = ts, np.arange(n), label
    elif mode == "wait":
        when, idx, lab = label_ts, np.arange(n), label
    else:  # every impression at once as a negative, the click later as a positive copy
        pos = np.flatnonzero(label == 1)
        when = np.concatenate([ts, label_ts[pos]])
        idx = np.concatenate([np.arange(n), pos])
        lab = np.concatenate([np.zeros(n, label.dtype), np.ones(len(pos), label.dtype)])
    order = np.lexsort((np.arange(len(when)), when))
    when, idx, lab = when[order], idx[order], lab[order]
    mem = None
    if with_memory:
        mem = ErrorCompensationMemory.from_config(
            MemoryConfig(**{**asdict(cfg.memory), "dim": memory_key_dim(learner.model, cfg.memory_key)})
        )
        keys = torch.zeros(n, memory_key_dim(learner.model, cfg.memory_key))
    p_base = torch.zeros(n)
    p_out = torch.zeros(n)
    fake = learnt = 0
    j = 0  # next training sample
    bs = cfg.batch_size
    for lo in range(0, n, bs):
        hi = min(lo + bs, n)
        # learn everything available strictly before this batch's first impression
        k = int(np.searchsorted(when, ts[lo], side="left"))
        while j < k:
            jj = min(j + bs, k)
            rows = torch.as_tensor(idx[j:jj])
            b = {
                "cat": batch["cat"][rows],
                "num": batch["num"][rows],
                "label": torch.as_tensor(lab[j:jj], dtype=torch.float32),
            }
            learn_weighted(learner, b, correction=correction)
            if mem is not None:  # the outcome reaches the memory with the key and prediction of impression time
                mem.write(keys[rows], b["label"], p_base[rows])
            learnt += jj - j
            fake += int(((lab[j:jj] == 0) & (y_true[idx[j:jj]] == 1)).sum())
            j = jj
        b = {"cat": batch["cat"][lo:hi], "num": batch["num"][lo:hi]}
        p, h = learner.predict(b)
        if mode == "fnc":
            p = fnc_calibrate(p)
        p_base[lo:hi] = p
        if mem is not None:
            key = memory_key(learner.model, b, h, cfg.memory_key)
            keys[lo:hi] = key
            p_out[lo:hi] = mem.estimate(key, p)
        else:
            p_out[lo:hi] = p
    return {"p": p_out.double().numpy(), "fake_negative_share": fake / max(learnt, 1), "learnt": learnt}


def cbpe_chunks(
    cfg: DelayedEvalConfig, p: np.ndarray, ts: np.ndarray, label: np.ndarray, label_ts: np.ndarray, start: int
) -> dict[str, Any]:
    """Label-free estimate per chunk of the test impressions vs the realised metric (see the docstring)."""
    return estimate_over_time(
        p,
        ts,
        label,
        label_ts,
        start=start,
        chunk=cfg.chunk,
        calibration_window=cfg.calibration_window,
        reference_chunks=cfg.reference_chunks,
    )


def run(cfg: DelayedEvalConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        delayed, nodelay, y_true = joined_examples(cfg)
        n = delayed.num_rows
        burn = int(n * cfg.burn_in)
        assert nodelay["impression_id"].to_pylist() == delayed["impression_id"].to_pylist()
        out: dict[str, Any] = {"config": {**asdict(cfg), "memory": asdict(cfg.memory)}, "variants": {}}
        for name in cfg.variants:
            mode = name.split("+")[0]
            ex = nodelay if mode == "no-delay" else delayed
            enc = FeatureEncoder(EncoderConfig(numeric_fields=NUMERIC, hash_buckets=cfg.hash_buckets)).fit(
                ex.slice(0, burn)
            )
            batch = enc.encode(ex)
            ts, label = ex["ts"].to_numpy(), ex["label"].to_numpy().astype(np.int8)
            lts = ex["label_ts"].to_numpy()
            r = simulate(cfg, batch, ts, label, lts, y_true, mode, name.endswith("+memory"))
            y, p = label[burn:], r["p"][burn:]
            out["variants"][name] = {
                "auc": auc(y, p),
                "logloss": logloss(y, p),
                "fake_negative_share": r["fake_negative_share"],
                "samples_learnt": r["learnt"],
            }
            if name == "wait":
                out["cbpe"] = cbpe_chunks(cfg, r["p"], ts, label, lts, burn)
            print(
                f"{name:18s} auc {out['variants'][name]['auc']:.4f} logloss {out['variants'][name]['logloss']:.4f} "
                f"fake negatives {r['fake_negative_share']:.3f}",
                flush=True,
            )
        lab = delayed["label"].to_numpy()
        out["stream"] = {
            "impressions": n,
            "attributed_positives": int(lab.sum()),
            "true_positives": int(y_true.sum()),
            "clicks_after_window": int(((y_true == 1) & (lab == 0)).sum()),
            "test_from": burn,
        }
        out["seconds"] = time.perf_counter() - t0
        return out
    finally:
        torch.set_num_threads(threads)


def table(result: dict[str, Any]) -> str:
    lines = ["| variant | AUC | logloss | fake negatives at training time |", "|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['auc']:.4f} | {v['logloss']:.4f} | {v['fake_negative_share']:.3f} |")
    c = result.get("cbpe")
    if c:
        lines += [
            "",
            f"CBPE on `wait` ({len(c['chunks'])} chunks): mean |expected - realised| AUC "
            f"{c['mae_auc']:.4f}, logloss {c['mae_logloss']:.4f} (uncalibrated logloss "
            f"{c['uncalibrated_mae_logloss']:.4f}); pending-only ({c['pending_chunks']} chunks with >= 50 open "
            f"windows): AUC {c['pending_mae_auc']}, logloss {c['pending_mae_logloss']}; monitor alarms at "
            f"chunks {c['monitor_alarms']}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:

    ap = argparse.ArgumentParser(prog="python -m reloop.evaluate_delayed", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="movielens-100k")
    ap.add_argument("--label-delay", default="exp:20m")
    ap.add_argument("--attribution-window", default="1h")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--chunk", type=int, default=2000, help="impressions per CBPE chunk")
    ap.add_argument("--out", default="results/delayed")
    a = ap.parse_args(argv)
    cfg = DelayedEvalConfig(
        dataset=a.dataset,
        label_delay=a.label_delay,
        window_ms=parse_duration_ms(a.attribution_window),
        seed=a.seed,
        limit=a.limit,
        batch_size=a.batch_size,
        variants=tuple(v for v in a.variants.split(",") if v),
        chunk=a.chunk,
    )
    result = run(cfg)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "delayed.json").write_text(json.dumps(result, indent=2, default=lambda x: None if x != x else str(x)))
    (out / "delayed.md").write_text(table(result) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
