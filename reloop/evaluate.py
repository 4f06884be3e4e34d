"""The chronological test-then-train evaluation of ``reloop evaluate``.

Protocol (``docs``: DESIGN.md, "Evaluation protocol"):

1. Load the events and compute their features with the same pure function as
   the Beam job (:func:`pipelines.aggregates.compute_features`), leak-free:
   every event sees only what happened strictly before it. The dataset loader
   spreads the events of one second 1 ms apart in stream order
   (``same_time="stream"``, the default, as for the replayed stream the feature
   job sees; ML-100K counts whole seconds), so "before" means before in the
   stream, as for the memory's per-event writes.
2. Warm-up = the first ``warmup`` fraction of events in time order. Its last
   ``validation`` share is the **validation slot**: the base model is trained
   on the warm-up before it, then test-then-trains the validation slot and is
   frozen. The memory hyper-parameters (K, lambda, tau, ...) are chosen on the
   validation slot (never on a test slot), per memory variant on the stream
   it will see: base+memory on the frozen model's predictions of the slot,
   incremental+memory on the predictions made while the model learns it;
   admissible = logloss no worse than the model alone, then best AUC.
3. The rest is cut into ``slots`` equal slots. For every mini-batch of every
   slot, every variant first predicts, is scored, then learns/writes:
   ``base`` (frozen), ``incremental`` (one optimizer step per batch after
   scoring), ``base+memory`` / ``incremental+memory`` (the same models'
   predictions corrected by an error-compensation memory written with each
   labelled outcome; the memory is rebuilt from a bounded buffer of the
   recent samples at the deployment of the model), ``river_lr`` / ``river_fm``
   (River, learning on the same encoded stream, one sample at a time).

Results: overall ``auc``/``gauc``/``logloss`` and a ``slots`` list per
variant, plus new-vs-returning users, the memory choice and its validation
scores, timings. Deterministic for a given seed.


A config is validated before any data is read:

>>> EvaluationConfig(model="xgboost")
Traceback (most recent call last):
...
reloop.evaluate.EvaluationError: model must be one of lr, deepfm, dcnv2, din, got 'xgboost'
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from online_models.encoding import EncoderConfig, FeatureEncoder
from online_models.errors import ReloopError
from online_models.learner import LearnerConfig, OnlineLearner, iter_batches
from online_models.memory import MEMORY_WRITES, ErrorCompensationMemory, MemoryConfig, write_groups
from online_models.metrics import SlotMetrics, summarize
from online_models.models import (
    HISTORY_FIELD,
    KINDS,
    MEMORY_KEYS,
    ModelConfig,
    build_model,
    memory_key,
    model_config_for,
)
from online_models.river_baselines import RiverBaseline
from online_models.settings import MODEL_ARCH, SERVING_MEMORY
from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES, AggregateConfig, FeatureState, compute_features
from pipelines.side_features import ITEM_ATTRIBUTES, ITEM_BAGS, USER_ATTRIBUTES, SideTables
from reloop.datasets import load_dataset
from reloop.side_tables import load_side_tables

SAME_TIME = ("stream", "timestamp")
#: validation AUCs closer than this are a tie in the memory's grid search (then fewer tables win)
AUC_TIE = 0.001
VARIANTS = ("base", "incremental", "base+memory", "incremental+memory", "river_lr", "river_fm")


class EvaluationError(ReloopError, ValueError):
    """An evaluation that cannot run as configured (the message says which setting)."""


@dataclass(frozen=True)
class EvaluationConfig:
    """Everything that decides an evaluation run (recorded in the result JSON)."""

    dataset: str = "movielens-100k"
    model: str = "dcnv2"
    slots: int = 10
    warmup: float = 0.5
    validation: float = 0.2  # share of the warm-up (its end) used as the validation slot
    seed: int = 0
    # test-then-train granularity: River learns one sample at a time and ML-100K users rate in bursts, so a model
    # that waits for 256 events before learning misses most of a session (River FM on the validation slot: AUC .753
    # per sample, .723 in batches of 256); 16 with Adagrad was chosen on the validation slot
    batch_size: int = 16
    warmup_epochs: int = 1
    limit: int | None = None
    # events with the same timestamp: "stream" = spread by 1 ms in stream order by the loader (the default, and
    # what `reloop replay` sends to the feature job), so the features of an event see the earlier events of its
    # second (ML-100K's timestamps are whole seconds: half of its events share a second with an earlier event of the
    # same user); "timestamp" = raw whole seconds (same-second events do not see each other)
    same_time: str = "stream"
    # model and optimizer
    # the architecture (defaults: online_models.settings.MODEL_ARCH, chosen here on the validation slot; the
    # trainer and the retrain take the same through the config's ``model`` section)
    embedding_dim: int = MODEL_ARCH["embedding_dim"]
    hidden_sizes: tuple[int, ...] = MODEL_ARCH["hidden_sizes"]
    dropout: float = MODEL_ARCH["dropout"]
    embedding_l2: float = MODEL_ARCH["embedding_l2"]
    hash_buckets: int = MODEL_ARCH["hash_buckets"]
    use_history: bool = False  # the user's last items as a field (always on for "din", which attends over them)
    # last N items kept per user (None: the feature job's AggregateConfig.last_n = 5). DIN with side features,
    # seed 1, incremental on the validation slot (AUC/logloss): 5 -> .7506/.5823, 10 -> .7506/.5819,
    # 20 -> .7486/.5837: 5 and 10 tie, so the feature job's 5 stays
    history_len: int | None = None
    # batch side tables (reloop.side_tables): user profile and item catalogue, joined point in time; ML-100K has
    # its own, other datasets need users_path/items_path (CSV)
    side_features: bool = False
    users_path: str | None = None
    items_path: str | None = None
    validation_only: bool = False  # stop after the validation slot (for choosing hyper-parameters on it)
    # None = all of USER_FEATURES + ITEM_FEATURES; () = ids only. The 4 CTRs beat all 26 windowed features on the
    # validation slot (DCNv2 AUC .7527 vs .7505)
    numeric_features: tuple[str, ...] | None = ("user_ctr_1d", "user_ctr_all", "item_ctr_1d", "item_ctr_all")
    logit_ctr: bool = False  # the numeric *_ctr_* features enter as log-odds (see EncoderConfig.logit_fields)
    optimizer: str = "adagrad"  # "adam" | "sgd" | "adagrad" (see LearnerConfig); chosen on validation
    lr: float = 0.1
    embedding_lr: float | None = None
    weight_decay: float = 1e-4
    # memory (the defaults of the grid search; the chosen values go to the result)
    memory: MemoryConfig = field(default_factory=lambda: MemoryConfig(dim=1))
    memory_key: str = SERVING_MEMORY["key"]  # "hidden" (ReLoop2), "hidden+ids", "hidden+user" (models.memory_key)
    memory_buffer: int = 20_000  # recent samples written into a freshly (re)built memory
    # when a labelled outcome reaches the memory: "timestamp" = as soon as its event time has passed (events of
    # the same millisecond are scored together, then written: strictly-before, like the features), "event" = right
    # after the event in stream order (River's learn_one timing), "batch" = after the whole mini-batch
    memory_write: str = "event"
    tune_memory: bool = True
    tables_grid: tuple[int, ...] = (8, 32)
    bits_grid: tuple[int, ...] = (10,)
    decay_grid: tuple[float, ...] = (0.999,)
    gamma_grid: tuple[float, ...] = (0.0, 1.0)
    lam_grid: tuple[float, ...] = (0.6, 1.0)
    tau_grid: tuple[float, ...] = (0.2, float("inf"))  # inf = uniform weights (the softmax's limit; cheaper)
    shrinkage_grid: tuple[float, ...] = (10.0,)
    eps_grid: tuple[float, ...] = (0.02,)
    # river baselines
    river_lr: float = 0.05
    river_fm_lr: float = 0.02
    river_fm_numeric: tuple[str, ...] = ("user_ctr_1d", "user_ctr_all", "item_ctr_1d", "item_ctr_all")
    variants: tuple[str, ...] = VARIANTS

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise EvaluationError(f"slots must be >= 1, got {self.slots}")
        if not 0.0 < self.warmup < 1.0:
            raise EvaluationError(f"warmup must be a fraction in (0, 1), got {self.warmup}")
        if not 0.0 < self.validation < 1.0:
            raise EvaluationError(f"validation must be a fraction of the warm-up in (0, 1), got {self.validation}")
        if self.batch_size < 1 or self.warmup_epochs < 1:
            raise EvaluationError("batch_size and warmup_epochs must be >= 1")
        if self.history_len is not None and self.history_len < 1:
            raise EvaluationError(f"history_len must be >= 1, got {self.history_len}")
        if self.model not in KINDS:
            raise EvaluationError(f"model must be one of {', '.join(KINDS)}, got {self.model!r}")
        if self.memory_write not in MEMORY_WRITES:
            raise EvaluationError(f"memory_write must be one of {', '.join(MEMORY_WRITES)}, got {self.memory_write!r}")
        if self.same_time not in SAME_TIME:
            raise EvaluationError(f"same_time must be one of {', '.join(SAME_TIME)}, got {self.same_time!r}")
        if self.memory_key not in MEMORY_KEYS:
            raise EvaluationError(f"memory_key must be one of {', '.join(MEMORY_KEYS)}, got {self.memory_key!r}")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise EvaluationError(f"unknown variant(s) {', '.join(sorted(unknown))}; known: {', '.join(VARIANTS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def with_history(self) -> bool:
        return self.use_history or self.model == "din"


@dataclass
class _Stream:
    """The encoded event stream and its split points."""

    batch: dict[str, torch.Tensor]
    users: np.ndarray
    ts: np.ndarray
    n: int
    train_end: int  # [0, train_end) trains the base model
    warm_end: int  # [train_end, warm_end) is the validation slot; [warm_end, n) the test slots
    slot_bounds: list[tuple[int, int]]
    encoder: FeatureEncoder

    def slice(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        return {k: v[lo:hi] for k, v in self.batch.items()}


def prepare_stream(cfg: EvaluationConfig) -> _Stream:
    """Events -> leak-free features (the Beam job's pure function) -> encoded tensors and split points."""

    events = load_dataset(cfg.dataset, limit=cfg.limit, spread_ties=cfg.same_time == "stream")
    agg = AggregateConfig() if cfg.history_len is None else AggregateConfig(last_n=cfg.history_len)
    feats, _, _ = compute_features(events, FeatureState.empty(), agg)
    categorical: tuple[str, ...] = ("user_id", "item_id")
    bags: tuple[str, ...] = ()
    if cfg.side_features:
        feats, categorical, bags = join_side_features(cfg, feats)
    n = feats.num_rows
    warm_end = int(n * cfg.warmup)
    train_end = int(warm_end * (1.0 - cfg.validation))
    if train_end < cfg.batch_size or n - warm_end < cfg.slots:
        raise EvaluationError(
            f"{n} events are too few for warmup={cfg.warmup}, validation={cfg.validation}, "
            f"slots={cfg.slots}, batch_size={cfg.batch_size}"
        )
    numeric = tuple(USER_FEATURES) + tuple(ITEM_FEATURES) if cfg.numeric_features is None else cfg.numeric_features
    unknown = [c for c in numeric if c not in feats.column_names]
    if unknown:
        raise EvaluationError(
            f"unknown numeric feature(s) {', '.join(unknown)}; known: {', '.join(USER_FEATURES + ITEM_FEATURES)}"
        )
    enc_cfg = EncoderConfig(
        categorical_fields=categorical,
        numeric_fields=numeric,
        bag_fields=bags,
        logit_fields=tuple(c for c in numeric if "_ctr_" in c) if cfg.logit_ctr else (),
        hash_buckets=cfg.hash_buckets,
        history_field=HISTORY_FIELD if cfg.with_history else None,
        history_len=agg.last_n or 1,
    )
    encoder = FeatureEncoder(enc_cfg).fit(feats.slice(0, train_end))
    batch = encoder.encode(feats)
    edges = np.linspace(warm_end, n, cfg.slots + 1).round().astype(int)
    bounds = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    users = np.asarray(feats["user_id"].to_numpy(zero_copy_only=False))
    ts = feats["ts"].to_numpy()
    return _Stream(batch, users, ts, n, train_end, warm_end, bounds, encoder)


def join_side_features(cfg: EvaluationConfig, feats: pa.Table) -> tuple[pa.Table, tuple[str, ...], tuple[str, ...]]:
    """``feats`` plus the side attributes valid at each event's time; the categorical and bag fields to encode."""

    users, items = load_side_tables(cfg.dataset, cfg.users_path, cfg.items_path)
    if users is None and items is None:
        raise EvaluationError(
            f"side_features: {cfg.dataset} has no side tables of its own; "
            f"give users_path and/or items_path (CSV, see reloop.side_tables)"
        )
    # the one point-in-time join of the trainer, the retrain and the serving loop (pipelines.side_features)
    feats = SideTables(users, items).join(feats)
    categorical: tuple[str, ...] = ("user_id", "item_id")
    bags: tuple[str, ...] = ()
    if users is not None:
        categorical += USER_ATTRIBUTES
    if items is not None:
        categorical += ITEM_ATTRIBUTES
        bags += ITEM_BAGS
    return feats, categorical, bags


def _model_config(cfg: EvaluationConfig, stream: _Stream) -> ModelConfig:
    arch = {k: getattr(cfg, k) for k in ("embedding_dim", "hidden_sizes", "dropout", "embedding_l2")}
    return model_config_for(cfg.model, stream.encoder.config, arch, weight_decay=cfg.weight_decay, seed=cfg.seed)


def _predict_all(
    learner: OnlineLearner, batch: dict[str, torch.Tensor], size: int, key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and memory keys of a frozen model over a long batch."""
    ps, ks = [], []
    for b in iter_batches(batch, size):
        p, h = learner.predict(b)
        ps.append(p)
        ks.append(memory_key(learner.model, b, h, key))
    return torch.cat(ps), torch.cat(ks)


def _replay_memory(
    mem: ErrorCompensationMemory,
    h: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    ts: np.ndarray,
    size: int,
    mode: str,
) -> torch.Tensor:
    """Test-then-write a frozen model's (hidden, prediction) stream through ``mem``; compensated predictions."""
    out = []
    for lo in range(0, len(p), size):
        sl = slice(lo, lo + size)
        out.append(mem.step(h[sl], p[sl], y[sl], write_groups(ts[sl], mode)))
    return torch.cat(out)


def tune_memory(
    cfg: EvaluationConfig,
    buf: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    users: np.ndarray,
    ts: np.ndarray,
) -> tuple[MemoryConfig, list[dict]]:
    """Grid over (K, L, decay, gamma, tau, shrinkage, eps, lam) on the validation slot.

    A memory written with ``buf`` (keys, predictions, labels before the slot) test-then-writes the slot ``val``.
    Admissible: logloss no worse than the model alone (else the model alone, lam = 0). Among the admissible
    settings within ``AUC_TIE`` of the best AUC, the fewest tables win (they cost less at serving time), then
    the lowest logloss.
    """
    (hb, pb, yb), (hv, pv, yv) = buf, val
    base = summarize(yv.numpy(), pv.numpy(), users)
    m0 = cfg.memory
    trials = [
        {
            "num_tables": m0.num_tables,
            "bits": m0.bits,
            "decay": m0.decay,
            "gamma": m0.gamma,
            "lam": 0.0,
            "tau": m0.tau,
            "shrinkage": 0.0,
            "eps": 0.0,
            **base,
        }
    ]
    grid = itertools.product(
        cfg.tables_grid,
        cfg.bits_grid,
        cfg.decay_grid,
        cfg.gamma_grid,
        cfg.tau_grid,
        cfg.shrinkage_grid,
        cfg.eps_grid,
        cfg.lam_grid,
    )
    for k, bits, decay, gamma, tau, s, eps, lam in grid:
        mc = replace(
            m0,
            dim=hb.shape[1],
            num_tables=k,
            bits=bits,
            decay=decay,
            gamma=gamma,
            lam=lam,
            tau=tau,
            shrinkage=s,
            eps=eps,
        )
        mem = ErrorCompensationMemory.from_config(mc)
        mem.write(hb, yb, pb)
        comp = _replay_memory(mem, hv, pv, yv, ts, cfg.batch_size, cfg.memory_write)
        trials.append(
            {
                "num_tables": k,
                "bits": bits,
                "decay": decay,
                "gamma": gamma,
                "lam": lam,
                "tau": tau,
                "shrinkage": s,
                "eps": eps,
                **summarize(yv.numpy(), comp.numpy(), users),
            }
        )
    ok = [t for t in trials if t["logloss"] is not None and t["logloss"] <= base["logloss"] + 1e-9]
    top = max(t["auc"] or 0.0 for t in ok)
    best = min((t for t in ok if (t["auc"] or 0.0) >= top - AUC_TIE), key=lambda t: (t["num_tables"], t["logloss"]))
    chosen = replace(
        m0,
        dim=hb.shape[1],
        num_tables=best["num_tables"],
        bits=best["bits"],
        decay=best["decay"],
        gamma=best["gamma"],
        lam=best["lam"],
        tau=best["tau"],
        shrinkage=best["shrinkage"],
        eps=best["eps"],
    )
    return chosen, trials


def run_evaluation(cfg: EvaluationConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the protocol of the module docstring; returns the JSON-ready result."""
    # small batches on a shared 2-core box: one intra-op thread is ~10x faster than two fighting threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: EvaluationConfig, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    stream = prepare_stream(cfg)
    t_features = time.perf_counter() - t_start
    bs = cfg.batch_size
    y_all = stream.batch["label"]

    # 1) base model on the warm-up before the validation slot (chronological mini-batches)
    learner = OnlineLearner(
        build_model(_model_config(cfg, stream)),
        LearnerConfig(
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            embedding_lr=cfg.embedding_lr,
            optimizer=cfg.optimizer,
            seed=cfg.seed,
        ),
    )
    for _ in range(cfg.warmup_epochs):
        for b in iter_batches(stream.slice(0, stream.train_end), bs):
            learner.learn(b)

    # 2) memory hyper-parameters on the validation slot, per memory variant, each on the stream it will see:
    #    base+memory on the frozen model's predictions, incremental+memory on the predictions of the model as it
    #    keeps learning the validation slot (test-then-train), which then becomes the base model
    buf_lo = max(0, stream.train_end - cfg.memory_buffer)
    pb, hb = _predict_all(learner, stream.slice(buf_lo, stream.train_end), bs, cfg.memory_key)
    buf = (hb, pb, y_all[buf_lo : stream.train_end])
    val_batch = stream.slice(stream.train_end, stream.warm_end)
    pv, hv = _predict_all(learner, val_batch, bs, cfg.memory_key)
    yv = y_all[stream.train_end : stream.warm_end]
    # 3) the base model also learns the validation slot (test-then-train), then it is frozen
    ps, ks = [], []
    for b in iter_batches(val_batch, bs):
        p, k = learner.test_then_train(b, key_fn=lambda b, h: memory_key(learner.model, b, h, cfg.memory_key))
        ps.append(p)
        ks.append(k)
    val_users, val_ts = stream.users[stream.train_end : stream.warm_end], stream.ts[stream.train_end : stream.warm_end]
    mem_cfgs = {name: replace(cfg.memory, dim=hb.shape[1]) for name in ("base+memory", "incremental+memory")}
    trials: dict[str, list[dict]] = {}
    if cfg.tune_memory:
        for name, (h_val, p_val) in (("base+memory", (hv, pv)), ("incremental+memory", (torch.cat(ks), torch.cat(ps)))):
            if name in cfg.variants:
                mem_cfgs[name], trials[name] = tune_memory(cfg, buf, (h_val, p_val, yv), val_users, val_ts)
    users_val = val_users
    validation = {
        "base": summarize(yv.numpy(), pv.numpy(), users_val),
        "incremental": summarize(yv.numpy(), torch.cat(ps).numpy(), users_val),
    }
    for name, tr in trials.items():
        chosen = mem_cfgs[name]
        validation[name] = next(
            (
                {k: t[k] for k in ("auc", "gauc", "logloss")}
                for t in tr
                if (t["num_tables"], t["lam"], t["tau"], t["gamma"])
                == (chosen.num_tables, chosen.lam, chosen.tau, chosen.gamma)
            ),
            validation["incremental"],
        )
    if cfg.validation_only:
        return {
            "config": cfg.to_dict(),
            "model_config": learner.model.config.to_dict(),
            "memory_configs": {name: c.to_dict() for name, c in mem_cfgs.items()},
            "validation": validation,
            "seconds": {"total": time.perf_counter() - t_start},
        }
    base = learner
    incremental = learner.clone()
    buf_lo = max(0, stream.warm_end - cfg.memory_buffer)
    recent = stream.slice(buf_lo, stream.warm_end)
    mems = {}
    for name, lrn in (("base+memory", base), ("incremental+memory", incremental)):
        mems[name] = ErrorCompensationMemory.from_config(mem_cfgs[name])
        mems[name].rebuild(
            iter_batches(recent, bs), lrn.model, key_fn=lambda b, h, m=lrn.model: memory_key(m, b, h, cfg.memory_key)
        )

    rivers = {}
    num_fields = stream.encoder.config.numeric_fields
    fm_numeric = tuple(num_fields.index(c) for c in cfg.river_fm_numeric if c in num_fields)
    for name, kind, lr, numeric in (
        ("river_lr", "lr", cfg.river_lr, None),
        ("river_fm", "fm", cfg.river_fm_lr, fm_numeric),
    ):
        if name in cfg.variants:
            rivers[name] = RiverBaseline(kind, lr=lr, seed=cfg.seed, numeric=numeric)
            rivers[name].learn(stream.slice(0, stream.warm_end))

    # 4) test slots: predict, score, then learn / write
    def inc_key(b: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        return memory_key(incremental.model, b, h, cfg.memory_key)

    metrics = {v: SlotMetrics() for v in cfg.variants}
    seconds = {v: 0.0 for v in cfg.variants}
    total = sum(math_ceil(hi - lo, bs) for lo, hi in stream.slot_bounds)
    done = 0
    for lo, hi in stream.slot_bounds:
        for b_lo in range(lo, hi, bs):
            b_hi = min(b_lo + bs, hi)
            b = stream.slice(b_lo, b_hi)
            y, users = b["label"], stream.users[b_lo:b_hi]
            groups = write_groups(stream.ts[b_lo:b_hi], cfg.memory_write)
            t0 = time.perf_counter()
            p_base, h_base = base.predict(b)
            h_base = memory_key(base.model, b, h_base, cfg.memory_key)
            seconds["base"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            # one pass scores (pre-update weights, eval mode), keys and learns the batch
            p_inc, h_inc = incremental.test_then_train(b, key_fn=inc_key)
            seconds["incremental"] += time.perf_counter() - t0
            preds = {"base": p_base, "incremental": p_inc}
            for name, (h, p) in (("base+memory", (h_base, p_base)), ("incremental+memory", (h_inc, p_inc))):
                if name in cfg.variants:
                    t0 = time.perf_counter()
                    preds[name] = mems[name].step(h, p, y, groups)
                    seconds[name] += time.perf_counter() - t0
            for name, model in rivers.items():
                t0 = time.perf_counter()
                preds[name] = model.test_then_train(b)
                seconds[name] += time.perf_counter() - t0
            for name in cfg.variants:
                metrics[name].update(y.numpy(), preds[name].double().numpy(), users)
            done += 1
            if progress:
                progress(done, total)
        for name in cfg.variants:
            metrics[name].end_slot()

    results = {name: metrics[name].result() for name in cfg.variants}
    returning = set(stream.users[: stream.warm_end].tolist())
    test_users = stream.users[stream.warm_end :]
    is_new = np.array([u not in returning for u in test_users.tolist()])
    cohorts = {}
    for name in cfg.variants:
        y, p, g = metrics[name].arrays()
        cohorts[name] = {
            "new": summarize(y[is_new], p[is_new], g[is_new]),
            "returning": summarize(y[~is_new], p[~is_new], g[~is_new]),
        }
    return {
        "config": cfg.to_dict(),
        "model_config": base.model.config.to_dict(),
        "memory_config": mem_cfgs["incremental+memory"].to_dict(),
        "memory_configs": {name: c.to_dict() for name, c in mem_cfgs.items()},
        "memory_validation": {
            "slot": [stream.train_end, stream.warm_end],
            "trials": trials.get("incremental+memory", []),
            "trials_base": trials.get("base+memory", []),
        },
        "split": {
            "events": stream.n,
            "train_end": stream.train_end,
            "warmup_end": stream.warm_end,
            "slots": stream.slot_bounds,
            "test_users": int(len(set(test_users.tolist()))),
            "test_users_new": int(len(set(test_users[is_new].tolist()))),
        },
        "variants": results,
        "cohorts": cohorts,
        "validation": validation,
        "seconds": {"features": t_features, "total": time.perf_counter() - t_start, **seconds},
    }


def math_ceil(n: int, d: int) -> int:
    return -(-n // d)


def write_results(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """The JSON (variants at top level under their names, as documented) and a PNG of AUC per slot."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {**result["variants"], **{k: v for k, v in result.items() if k != "variants"}}
    out.write_text(json.dumps(doc, indent=2, default=_json_default))
    png = out.with_suffix(".png")
    plot_slots(result, png)
    return out, png


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def plot_slots(result: dict[str, Any], path: Path) -> None:
    # matplotlib here, not at the top: the headless backend must be chosen before pyplot loads, and choosing
    # it at import would change the backend of any program (a notebook) that imports this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, res in result["variants"].items():
        aucs = [s["auc"] if s["auc"] is not None else np.nan for s in res["slots"]]
        ax.plot(range(1, len(aucs) + 1), aucs, marker="o", label=f"{name} ({res['auc']:.4f})")
    cfg = result["config"]
    ax.set_xlabel("test slot (chronological)")
    ax.set_ylabel("AUC")
    ax.set_title(f"{cfg['dataset']} / {cfg['model']}: AUC per slot (seed {cfg['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no timestamp/version: same seed, same bytes
    plt.close(fig)


def evaluate_and_report(cfg: EvaluationConfig, out: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Run, write JSON + PNG, print a table (the body of ``reloop evaluate``)."""

    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]evaluate[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show_progress,
    ) as bar:
        task = bar.add_task(f"{cfg.dataset} / {cfg.model}", total=None)
        result = run_evaluation(cfg, progress=lambda done, total: bar.update(task, completed=done, total=total))
    json_path, png_path = write_results(result, out)
    table = Table(
        title=f"{cfg.dataset} / {cfg.model}, seed {cfg.seed}: {cfg.slots} test slots after {cfg.warmup:.0%} warm-up"
    )
    for col in ("variant", "AUC", "gAUC", "logloss", "AUC new users", "AUC returning"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, res in result["variants"].items():
        co = result["cohorts"][name]
        table.add_row(
            name,
            *(_fmt(x) for x in (res["auc"], res["gauc"], res["logloss"], co["new"]["auc"], co["returning"]["auc"])),
        )
    Console().print(table)
    for name, m in result["memory_configs"].items():
        Console().print(
            f"{name} memory (chosen on validation events {result['memory_validation']['slot']}): "
            f"K={m['num_tables']} L={m['bits']} tau={m['tau']} gamma={m['gamma']} lam={m['lam']} "
            f"shrinkage={m['shrinkage']} eps={m['eps']} decay={m['decay']}"
        )
    Console().print(f"wrote {json_path} and {png_path} in {result['seconds']['total']:.1f}s")
    return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
