"""The retrain job: Ray Train ``TorchTrainer`` (1..n workers) on a recent window of training examples.

The window (the last ``window_days`` of examples, or ``[ts_min, ts_max)``) is
split by time: the newest ``holdout_fraction`` is the holdout, the rest is
trained on for ``epochs`` by ``num_workers`` data-parallel workers (DDP over
gloo; each worker takes every n-th row). Worker 0 scores the holdout and
reports AUC, gAUC and logloss with the weights as a Ray Train checkpoint;
the driver publishes them as a **candidate** registry version (with the
holdout metrics, the holdout metrics of the version current at the time on
the same rows, and the training range), and promotes it only if asked.
``TorchTrainer.fit`` has 15-25 s of fixed overhead on 2 cores: the
incremental trainer (:mod:`jobs.trainer`) handles the per-batch updates.

    python -m jobs.retrain --examples .state/examples --registry .state/registry --window-days 7 --workers 2
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.retrain --examples /abs/...


The window's newest rows are the holdout the candidate is judged on:

>>> import pyarrow as pa
>>> train, holdout = split_window(pa.table({"ts": list(range(10))}), 0.2)
>>> train.num_rows, holdout["ts"].to_pylist()
(8, [8, 9])
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from features.windows import DAY_MS, feature_service_name
from jobs.config import load_jobs_config as load_config
from jobs.examples import ExampleStore
from jobs.ray_local import init_local
from jobs.registry import ModelRegistry, load_model
from jobs.trainer import encoder_config_for, reads_side_features
from online_models.encoding import EncoderConfig, FeatureEncoder
from online_models.metrics import summarize
from online_models.models import KINDS, ModelConfig, build_model, model_config_for, predict_table
from online_models.settings import MODEL_ARCH
from pipelines.side_features import feast_batch_root, side_source

# Ray is imported inside train_loop_per_worker, run_retrain and main, where a retrain runs: Ray reads its auth
# mode and token when its core library loads, and the cluster profile sets them after jobs.deploy (and so
# reloop.run) has imported this module


@dataclass(frozen=True)
class RetrainConfig:
    """The whole configuration of one retrain run."""

    examples_uri: str
    registry_uri: str
    storage_path: str  # Ray Train run directory (absolute, or a URI such as s3://b/ray_train)
    model_kind: str = "dcnv2"
    feature_service: str | None = None  # default: features.windows.feature_service_name(model_kind)
    window_days: float | None = 7.0
    ts_min: int | None = None
    ts_max: int | None = None
    holdout_fraction: float = 0.1
    epochs: int = 2
    batch_size: int = 512
    lr: float = 1e-3
    hash_buckets: int = MODEL_ARCH["hash_buckets"]
    #: a cold fit's model shape beyond what the data decides (the config's ``model`` section); empty:
    #: :data:`online_models.settings.MODEL_ARCH`. A warm start keeps its version's whole model config.
    architecture: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 1
    #: placement of the workers' bundles: PACK (default), SPREAD, or STRICT_SPREAD (one worker per node)
    placement_strategy: str = "PACK"
    #: how often a failed fit is tried again (worker errors, lost nodes, a worker group that cannot be placed);
    #: 0: the retrain fails at the first one and the current model stays
    max_failures: int = 0
    promote: bool = False
    seed: int = 0
    #: warm start: fine-tune this registry version (its encoder and weights) instead of a cold fit
    init_version: str | None = None
    #: with a warm start, add a uniform sample of older examples (before ts_min) of this many times the
    #: window's rows, so the fine-tune does not forget what still holds
    replay_ratio: float = 0.0
    #: side features (as :attr:`jobs.trainer.TrainerConfig.side_tables_uri`): the window is joined point in time
    #: with the side tables there, and a cold fit's encoder reads them; None: none (a warm start whose
    #: encoder reads them then fails with the reason)
    side_tables_uri: str | None = None

    def __post_init__(self) -> None:
        if self.replay_ratio < 0:
            raise ValueError(f"replay_ratio must be >= 0, got {self.replay_ratio}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.num_workers < 1 or self.epochs < 1:
            raise ValueError("num_workers and epochs must be >= 1")
        if self.feature_service is None:
            object.__setattr__(
                self, "feature_service", feature_service_name(self.model_kind, side=self.side_tables_uri is not None)
            )


def _store(cfg: RetrainConfig):
    """The example store of the window, joined with the side tables when configured."""
    return ExampleStore(cfg.examples_uri, side=side_source(cfg.side_tables_uri))


def resolve_window(cfg: RetrainConfig) -> tuple[int | None, int | None]:
    """``[ts_min, ts_max)`` of the run: explicit bounds, or the last ``window_days`` before the newest example."""
    if cfg.ts_min is not None or cfg.window_days is None:
        return cfg.ts_min, cfg.ts_max

    ts = ExampleStore(cfg.examples_uri, columns=["ts"]).read_window(None, cfg.ts_max)
    if ts.num_rows == 0:
        raise ValueError(f"{cfg.examples_uri}: no training examples")
    newest = int(ts["ts"].to_numpy().max())
    return newest + 1 - int(cfg.window_days * DAY_MS), cfg.ts_max if cfg.ts_max is not None else newest + 1


def split_window(table, holdout_fraction: float):
    """(train, holdout) by time: the newest ``holdout_fraction`` of rows is the holdout."""
    n_hold = max(1, int(round(table.num_rows * holdout_fraction)))
    return table.slice(0, table.num_rows - n_hold), table.slice(table.num_rows - n_hold)


def evaluate(model, encoder, table) -> dict[str, float]:
    """Holdout AUC, gAUC (per user), logloss, n of ``model`` on ``table``."""
    p = predict_table(model, encoder, table, 4096)
    y = table["label"].to_numpy().astype(np.float64)
    groups = table["user_id"].to_numpy(zero_copy_only=False)
    return {k: float(v) for k, v in summarize(y, p, groups).items() if v is not None}


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: :func:`fit_starts` with DDP over the worker group; worker 0 puts every model in one
    checkpoint (``start-<i>.*`` files). One fit for every candidate: the worker group's start-up (processes, imports,
    the process group) is the larger part of a retrain on a small window."""
    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # where every worker runs, gathered to worker 0 for the record (which nodes took part)
    nodes: list[Any] = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    fitted = fit_starts(loop, rank, world, nodes)
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            # flat, one prefix per start: an object store has no directories, and Ray's download of a
            # checkpoint with sub-directories from s3proxy fails (FileNotFoundError on the sub-directory)
            for i, metrics in enumerate(fitted):
                save_file(
                    {k: v.detach().contiguous() for k, v in metrics.pop("_weights").items()},
                    os.path.join(d, f"start-{i}.model.safetensors"),
                )
                with open(os.path.join(d, f"start-{i}.meta.json"), "w") as f:
                    json.dump(metrics.pop("_meta"), f)
                with open(os.path.join(d, f"start-{i}.metrics.json"), "w") as f:
                    json.dump(metrics, f)
            ray.train.report(fitted[-1], checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(fitted[-1])


def fit_starts(loop: dict[str, Any], rank: int = 0, world: int = 1, nodes: list[Any] | None = None) -> list[dict]:
    """Read the window and fit a model per start (``loop["starts"]``: a registry version to warm-start from,
    or None for a cold fit), as worker ``rank`` of ``world``; on worker 0 each result carries its weights
    (``_weights``) and record (``_meta``) beside its metrics."""
    cfg = RetrainConfig(**loop["config"])
    torch.set_num_threads(1)
    store = _store(cfg)
    table = store.read_window(loop["ts_min"], loop["ts_max"])
    window_train, holdout = split_window(table, cfg.holdout_fraction)
    return [
        _fit_one(cfg, start, store, table, window_train, holdout, loop, rank, world, nodes or [])
        for start in loop.get("starts", [cfg.init_version])
    ]


class RetrainWorker:
    """A long-lived retrain worker (a Ray actor: ``ray.remote(num_cpus=1)(RetrainWorker).remote()``) for
    single-worker retrains: torch and this module are imported once, when the actor starts, not per retrain.

    A ``TorchTrainer`` fit starts a controller and a worker group each time, 13-21 s on 2 cores for a fit that
    does nothing (``benchmarks/bench_drift_loop.py``); a retrain on a drift window trains for a few seconds.
    Multi-worker (DDP) retrains keep using Ray Train (:func:`run_retrains` without a worker).
    """

    def node(self) -> str:
        import ray  # in the actor (see the note on Ray at the top)

        return ray.get_runtime_context().get_node_id()

    def fit(self, loop: dict[str, Any]) -> list[dict[str, Any]]:
        """:func:`fit_starts` as the only worker: each result with its weights, record and metrics."""
        return fit_starts(loop, 0, 1, [self.node()])


def _fit_one(cfg, start, store, table, train, holdout, loop, rank: int, world: int, nodes) -> dict[str, Any]:
    """Fit one model on the window (warm from registry version ``start``, or cold); worker 0 adds its weights,
    its record (``_meta``) and its holdout metrics."""
    if start:
        # warm start: the served model's own encoder and weights, fine-tuned on the window (+ a replay sample)
        entry, base = load_model(ModelRegistry(cfg.registry_uri), start)
        enc = FeatureEncoder(EncoderConfig.from_dict(entry.extra["encoder"]))
        if reads_side_features(enc.config) and store.side is None:
            raise ValueError(f"{start} reads side attributes: give side_tables_uri for its warm start")
        mc = ModelConfig.from_dict(entry.model_config)
        if cfg.replay_ratio > 0 and loop["ts_min"] is not None:
            older = store.read_window(None, loop["ts_min"])
            k = min(older.num_rows, int(cfg.replay_ratio * train.num_rows))
            if k:
                pick = np.sort(np.random.default_rng(cfg.seed).choice(older.num_rows, k, replace=False))
                train = pa.concat_tables(
                    [older.take(pick).select(train.column_names), train], promote_options="permissive"
                )
    else:
        side = cfg.side_tables_uri is not None
        enc = FeatureEncoder(encoder_config_for(table.column_names, cfg.model_kind, cfg.hash_buckets, side)).fit(train)
        mc = model_config_for(cfg.model_kind, enc.config, cfg.architecture, seed=cfg.seed)
        base = build_model(mc)
    ec = enc.config
    import ray.train.torch  # in the worker (see the note on Ray at the top)

    # some models hold parameters a batch may not touch (LR's unused tables): DDP must not wait for them
    model = (
        ray.train.torch.prepare_model(base, parallel_strategy_kwargs={"find_unused_parameters": True})
        if world > 1
        else base
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # equal shards (every world-th row) so every worker runs the same number of DDP steps
    per = train.num_rows // world
    shard = train.take(np.arange(rank, per * world, world))
    rng = np.random.default_rng(cfg.seed + rank)
    t0 = time.time()
    for _epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(shard.num_rows)
        total = 0.0
        for lo in range(0, shard.num_rows, cfg.batch_size):
            batch = enc.encode(shard.take(order[lo : lo + cfg.batch_size]))
            logits, _ = model(batch)
            loss = F.binary_cross_entropy_with_logits(logits, batch["label"]) + base.regularization()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(logits)
    metrics: dict[str, Any] = {
        "epoch": cfg.epochs - 1,
        "train_loss": total / max(1, shard.num_rows),
        "train_rows": train.num_rows,
        "seconds": time.time() - t0,
    }
    if rank == 0:
        metrics.update({f"holdout_{k}": v for k, v in evaluate(base, enc, holdout).items()})
        metrics["_weights"] = base.state_dict()
        metrics["_meta"] = {
            "start": start,
            "model_config": mc.to_dict(),
            "encoder_config": ec.to_dict(),
            "train_rows": train.num_rows,
            "holdout_rows": holdout.num_rows,
            "worker_nodes": nodes,
            "train_ts": [int(pc.min(train["ts"]).as_py()), int(pc.max(train["ts"]).as_py())],
            "holdout_ts": [int(holdout["ts"][0].as_py()), int(holdout["ts"][-1].as_py())],
            # under delayed labels what it knows reaches to the newest label's arrival
            "label_ts_max": max(int(pc.max(t["label_ts"]).as_py()) for t in (train, holdout))
            if "label_ts" in train.column_names
            else None,
        }
    return metrics


def run_retrain(cfg: RetrainConfig) -> dict[str, Any]:
    """Fit on Ray (already initialised), publish the candidate; returns a summary (version, metrics)."""
    return run_retrains(cfg, [cfg.init_version])[0]


def run_retrains(cfg: RetrainConfig, starts: list[str | None], worker=None) -> list[dict[str, Any]]:
    """One fit of a model per start (a registry version to warm-start from with ``cfg.replay_ratio``, or None:
    cold), each published as a candidate; returns their summaries in the order of ``starts``.

    With ``worker`` (a :class:`RetrainWorker` actor) and one worker configured, the fit runs on it; otherwise
    on Ray Train (``TorchTrainer``, ``cfg.num_workers`` workers with DDP, checkpointed to ``storage_path``)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not starts:
        raise ValueError("run_retrains needs at least one start (a version, or None for a cold fit)")
    ts_min, ts_max = resolve_window(cfg)
    loop = {"config": asdict(cfg), "ts_min": ts_min, "ts_max": ts_max, "starts": list(starts)}
    t0 = time.time()
    fitted: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    checkpoint: str | None = None
    if worker is not None and cfg.num_workers == 1:
        for metrics in ray.get(worker.fit.remote(loop)):
            fitted.append((metrics.pop("_weights"), metrics.pop("_meta"), metrics))
    else:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop,
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers,
                use_gpu=False,
                resources_per_worker={"CPU": 1},
                placement_strategy=cfg.placement_strategy,
            ),
            # a lost node counts like any failure: by default Ray Train retries preemptions and controller
            # errors (a worker group that cannot be placed again) forever, which would wedge the deployer
            run_config=RunConfig(
                name=f"retrain-{int(time.time())}",
                storage_path=cfg.storage_path,
                failure_config=FailureConfig(
                    max_failures=cfg.max_failures,
                    controller_failure_limit=cfg.max_failures,
                    max_preemption_failures=cfg.max_failures,
                ),
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"retrain produced no checkpoint: {result.error}")
        checkpoint = result.checkpoint.path
        with result.checkpoint.as_directory() as d:
            for i in range(len(starts)):
                stem = os.path.join(d, f"start-{i}")
                with open(f"{stem}.meta.json") as f, open(f"{stem}.metrics.json") as g:
                    fitted.append((load_file(f"{stem}.model.safetensors"), json.load(f), json.load(g)))
    fit_s = time.time() - t0
    registry = ModelRegistry(cfg.registry_uri)
    current = registry.current()
    reference: dict[str, Any] | None = None
    if current is not None:  # the reference for a promotion gate: the serving model on the same holdout
        try:
            entry, model = load_model(registry, current)
            table = _store(cfg).read_window(ts_min, ts_max)
            _, holdout = split_window(table, cfg.holdout_fraction)
            enc = FeatureEncoder(EncoderConfig.from_dict(entry.extra["encoder"]))
            reference = {"version": current, **evaluate(model, enc, holdout)}
        except Exception as e:  # a broken current version must not stop a retrain that could replace it
            reference = {"version": current, "error": str(e)}
    out = []
    for (weights, meta, raw), start in zip(fitted, starts):
        metrics = {k: float(v) for k, v in raw.items() if k.startswith("holdout_") or k == "train_loss"}
        extra: dict[str, Any] = {
            "encoder": meta["encoder_config"],
            "source": "jobs.retrain",
            "num_workers": cfg.num_workers,
            "epochs": cfg.epochs,
            "fit_seconds": fit_s,
            "fitted_with": len(starts),  # candidates of the same fit (fit_seconds is theirs together)
            "worker_nodes": meta.get("worker_nodes", []),
            "start": f"warm from {start}" if start else "cold",
            "replay_ratio": cfg.replay_ratio if start else 0.0,
        }
        if reference is not None:
            extra["holdout_current"] = reference
        entry = registry.publish(
            weights,
            model_config=meta["model_config"],
            feature_service=cfg.feature_service,
            training_range={
                "ts_min": ts_min,
                "ts_max": ts_max,
                "train_ts": meta["train_ts"],
                "holdout_ts": meta["holdout_ts"],
                "train_rows": meta["train_rows"],
                "holdout_rows": meta["holdout_rows"],
                # the causal horizon: nothing of the window may be served by it
                "trained_until_ts": max(meta["train_ts"][1], meta["holdout_ts"][1], meta.get("label_ts_max") or -1),
            },
            metrics=metrics,
            extra=extra,
            promote=cfg.promote,
        )
        out.append(
            {
                "version": entry.version,
                "start": extra["start"],
                "promoted": cfg.promote,
                "metrics": metrics,
                "trained_until_ts": entry.training_range["trained_until_ts"],
                "holdout_current": extra.get("holdout_current"),
                "fit_seconds": round(fit_s, 1),
                "worker_nodes": extra["worker_nodes"],
                "checkpoint": checkpoint,  # Ray Train's (None from a RetrainWorker: the registry holds it)
            }
        )
    return out


def parse_args(argv: list[str] | None = None) -> tuple[RetrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m jobs.retrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="reloop YAML config (defaults for the paths)")
    p.add_argument("--examples")
    p.add_argument("--registry")
    p.add_argument("--storage-path", help="Ray Train run directory (default: <state>/ray_train)")
    p.add_argument("--model", default=None, choices=list(KINDS), help="default: the config's model.kind")
    p.add_argument("--feature-service", default=None)
    p.add_argument("--window-days", type=float, default=7.0)
    p.add_argument("--ts-min", type=int, default=None)
    p.add_argument("--ts-max", type=int, default=None)
    p.add_argument("--holdout", type=float, default=0.1, help="newest fraction of the window held out")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--placement",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_SPREAD"],
        help="STRICT_SPREAD: every worker on its own node",
    )
    p.add_argument("--promote", action="store_true")
    p.add_argument("--address", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--side-tables",
        default=None,
        help="side features: the user_profile/item_catalog batch sources "
        "(default with trainer.side_features: the Feast repo's)",
    )
    a = p.parse_args(argv)

    c = load_config(a.config)
    if a.side_tables is None and c.trainer.side_features:  # the Feast repo's batch sources (reloop side-tables)
        a.side_tables = feast_batch_root(c.feast)
    examples = os.path.abspath(a.examples or c.storage.examples_uri) if "://" not in (a.examples or "") else a.examples
    registry = a.registry or c.storage.registry_uri
    if "://" not in registry:
        registry = os.path.abspath(registry)
    storage = a.storage_path or os.path.join(os.path.dirname(os.path.abspath(c.storage.examples_uri)), "ray_train")
    if "://" not in storage:  # s3://... is for Ray Train to open; a local one must be absolute
        storage = os.path.abspath(storage)
    return RetrainConfig(
        examples_uri=examples,
        registry_uri=registry,
        storage_path=storage,
        model_kind=a.model or c.model.kind,
        hash_buckets=c.model.hash_buckets,
        architecture=c.model.architecture(),
        feature_service=a.feature_service,
        window_days=a.window_days,
        ts_min=a.ts_min,
        ts_max=a.ts_max,
        holdout_fraction=a.holdout,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        num_workers=a.workers,
        placement_strategy=a.placement,
        promote=a.promote,
        seed=a.seed,
        side_tables_uri=a.side_tables,
    ), a


def main(argv: list[str] | None = None) -> int:
    import ray

    cfg, a = parse_args(argv)
    if os.environ.get("RAY_ADDRESS") or a.address:
        ray.init(address=a.address)
    else:
        init_local(num_cpus=max(2, cfg.num_workers + 1))
    try:
        print("[retrain] " + json.dumps(run_retrain(cfg)), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
