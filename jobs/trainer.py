"""The incremental trainer: a long-lived Ray actor doing test-then-train on new training examples.

It reads the training examples written since its checkpointed position
(:mod:`jobs.examples`), and for each mini-batch first **scores** it with the
current weights (the pre-update predictions are the streaming metric: logged
with the checkpoint and summarised as logloss/AUC) and then **learns** from
it. Every ``checkpoint_every`` examples or ``checkpoint_seconds`` it writes a
self-describing checkpoint: weights, optimizer and RNG state (safetensors +
``torch.save`` read back with ``weights_only=True``), the model and encoder
configs, the position in the example store, and the count and digest of the
examples learned. A checkpoint becomes the latest by an atomic rename of the
``LATEST`` pointer, so a crash at any instant resumes from a whole
checkpoint: the examples learned after it are learned again from the same
weights, and every example is learned exactly once by the surviving state
(``learned`` = number of examples, ``digest`` = sum of their event-id hashes).

Optionally it publishes a registry version every N checkpoints (a candidate
for the policy, or promoted at once with ``--promote``).

Locally (embedded Ray)::

    python -m jobs.trainer --examples .state/examples --checkpoint-dir .state/trainer --idle-exit 10

On a cluster (paths must be absolute: the job runs in an uploaded copy of the working dir)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", ".state", ".git", "infra/kafka/lib"]}' \\
        -- python -m jobs.trainer --examples $PWD/.state/examples --checkpoint-dir $PWD/.state/trainer
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from sklearn.metrics import roc_auc_score

from features.windows import feature_service_name
from jobs.checkpoints import CheckpointStore
from jobs.config import load_jobs_config as load_config
from jobs.examples import ExampleStore, Position
from jobs.ray_local import init_local
from jobs.registry import ModelRegistry, load_model
from jobs.scoring import horizon_of
from jobs.timing import StageTimes
from online_models.encoding import EncoderConfig, FeatureEncoder
from online_models.errors import ReloopError
from online_models.learner import LearnerConfig, OnlineLearner
from online_models.models import KINDS, ModelConfig, build_model, history_field, model_config_for
from online_models.settings import MODEL_ARCH
from pipelines.aggregates import ITEM_FEATURES, USER_FEATURES
from pipelines.side_features import SIDE_BAGS, SIDE_CATEGORICAL, feast_batch_root, side_source

CKPT_FORMAT = "reloop.trainer-checkpoint/2"  # 2: the optimizers of an OnlineLearner
RAY_EXCLUDES = [
    ".venv",
    ".state",
    ".git",
    ".pytest_cache",
    "infra/kafka/lib",
    "infra/kafka/target",
    "features/data",
    "reports",
    "benchmarks/results",
    "**/__pycache__",
]


class TrainerError(ReloopError, RuntimeError):
    """A trainer that cannot start or continue (bad checkpoint, no usable columns...)."""


@dataclass(frozen=True)
class TrainerConfig:
    """The whole configuration of an incremental trainer."""

    examples_uri: str
    checkpoint_dir: str
    registry_uri: str | None = None
    feature_service: str | None = None  # default: features.windows.feature_service_name(model_kind)
    model_kind: str = "dcnv2"
    hash_buckets: int = MODEL_ARCH["hash_buckets"]
    #: the model's shape beyond what the data decides (:func:`online_models.models.model_config_for`; the
    #: config's ``model`` section); empty: :data:`online_models.settings.MODEL_ARCH`
    architecture: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256
    #: the optimizer of :class:`online_models.learner.OnlineLearner` (sparse id rows, one forward pass per
    #: test-then-train step); the defaults are the evaluation's (``reloop evaluate``, chosen on validation)
    optimizer: str = "adagrad"
    lr: float = 0.1
    weight_decay: float = 1e-4
    checkpoint_every: int = 5_000  # examples
    checkpoint_seconds: float = 30.0
    publish_every: int = 0  # checkpoints between registry versions (0 = never)
    promote: bool = False  # promote each published version at once
    poll_seconds: float = 1.0
    idle_exit: float | None = None  # stop after this long without new examples (None: run forever)
    max_examples: int | None = None  # stop after learning this many in this run
    throttle_seconds: float = 0.0  # pause per batch (share a small machine; crash tests)
    seed: int = 0
    #: examples (in store order) learned freely before the serving clock bounds the trainer (see
    #: :meth:`IncrementalTrainer.allow`): the bootstrap model's warm-up, which serving never scores
    free_examples: int | None = None
    #: side features: the batch sources of Feast's ``user_profile`` / ``item_catalog`` (a directory or URI with
    #: ``user_profile/*.parquet``, ``item_catalog/*.parquet``: ``reloop side-tables`` writes them into the Feast
    #: repo, ``reloop run --side-features`` under its state). Set, the examples are joined with them point in
    #: time (:mod:`pipelines.side_features`), the encoder reads the side attributes, and versions are published
    #: under ``feature_service_name(model_kind, side=True)``. None: ids, aggregates (and history) only
    side_tables_uri: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.checkpoint_every < 1:
            raise TrainerError("batch_size and checkpoint_every must be >= 1")
        if not self.lr > 0:
            raise TrainerError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "sgd", "adagrad"):
            raise TrainerError(f"optimizer must be adam, sgd or adagrad, got {self.optimizer!r}")
        if self.feature_service is None:
            object.__setattr__(
                self, "feature_service", feature_service_name(self.model_kind, side=self.side_tables_uri is not None)
            )


def event_digest(event_ids: list[str]) -> int:
    """Sum (mod 2^64) of 64-bit hashes of event ids: equal sums <=> same multiset, with high probability.

    >>> event_digest(["a", "b"]) == event_digest(["b", "a"]) != event_digest(["a", "a"])
    True
    """
    h = np.array(
        [int.from_bytes(hashlib.blake2b(e.encode(), digest_size=8).digest(), "little") for e in event_ids],
        dtype=np.uint64,
    )
    return int(h.sum(dtype=np.uint64)) if len(h) else 0


def feature_columns(names: list[str]) -> list[str]:
    """The numeric feature columns (user_/item_ aggregates) present in a table of examples."""

    return [c for c in (*USER_FEATURES, *ITEM_FEATURES) if c in names]


def encoder_config_for(names: list[str], model_kind: str, hash_buckets: int, side: bool = False) -> EncoderConfig:
    """The (unfitted) encoder of a cold start over examples with columns ``names``: the ids, the numeric
    aggregates present, the history a model kind reads, and with ``side`` the side attributes and bags."""
    return EncoderConfig(
        categorical_fields=("user_id", "item_id") + (SIDE_CATEGORICAL if side else ()),
        numeric_fields=tuple(feature_columns(names)),
        bag_fields=SIDE_BAGS if side else (),
        hash_buckets=hash_buckets,
        history_field=history_field(model_kind),
    )


def reads_side_features(encoder: EncoderConfig) -> bool:
    """Whether an encoder reads side attributes (its examples must be joined with the side tables)."""
    return bool(set(encoder.categorical_fields + encoder.bag_fields) & set(SIDE_CATEGORICAL + SIDE_BAGS))


class IncrementalTrainer:
    """Test-then-train over the example store, with exact resume (see the module docstring)."""

    def __init__(self, config: TrainerConfig) -> None:

        self.config = config
        self.store = ExampleStore(config.examples_uri, side=side_source(config.side_tables_uri))
        self.position = Position()
        self.learned, self.digest, self.seq = 0, 0, 0
        #: the event time of the newest example learned (its checkpoints may serve only later events)
        self.trained_until_ts: int | None = None
        #: how many examples (in store order) the serving clock lets the trainer learn; None: no bound
        self.allowed: int | None = None
        self.model = self.learner = self.encoder = None
        self.model_config: dict[str, Any] = {}
        self.metrics = {"n": 0, "logloss_sum": 0.0, "pos": 0}
        self.runs: list[dict[str, Any]] = []
        self.pending_preds: list[pa.Table] = []
        self.last_published: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by allow() and stop(): the idle wait ends at once
        self._allowed_at = 0.0  # when the serving clock last moved (monotonic)
        self._lock = threading.RLock()  # a batch's update, a checkpoint and adopt() never interleave
        #: the registry version whose weights the trainer took over last (a promoted retrain), if any
        self.adopted: str | None = None
        self._since_ckpt, self._ckpt_time = 0, time.monotonic()
        #: where the run's wall time goes (learning, checkpoints, waits): the time budget of ``reloop run``
        self.times = StageTimes()
        # checkpoints are written (and published) off the learning thread, one at a time (see checkpoint())
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-checkpoint")
        self._writing: Future | None = None
        # one intra-op thread: a step is many small ops, and a second OpenMP thread waits on a core that the
        # serving process holds (bench_train.py, batch 256: 0.04x River LR with 2 threads, ~1x with 1)
        torch.set_num_threads(1)
        self.ckpts = CheckpointStore(config.checkpoint_dir)
        resumed = self._restore()
        self.runs.append(
            {"started_at": time.time(), "resumed_from": resumed, "resumed_learned": self.learned, "pid": os.getpid()}
        )
        self._heartbeat()

    # ---- model set-up ----------------------------------------------------------------------------
    def _build(self, first: pa.Table | None, model_config: dict | None = None, encoder_config: dict | None = None):

        if encoder_config is None:
            side = self.config.side_tables_uri is not None
            enc = FeatureEncoder(
                encoder_config_for(first.column_names, self.config.model_kind, self.config.hash_buckets, side)
            )
            encoder_config = enc.fit(first).config.to_dict()
        self.encoder = FeatureEncoder(EncoderConfig.from_dict(encoder_config))
        if reads_side_features(self.encoder.config) and self.store.side is None:
            raise TrainerError(
                "the checkpoint's encoder reads side attributes (user profile, item catalogue): "
                "give the side tables' location (TrainerConfig.side_tables_uri, --side-tables)"
            )
        if model_config is None:
            model_config = model_config_for(
                self.config.model_kind,
                self.encoder.config,
                self.config.architecture,
                weight_decay=self.config.weight_decay,
                seed=self.config.seed,
            ).to_dict()
        self.model_config = model_config
        torch.manual_seed(self.config.seed)
        self.model = build_model(ModelConfig.from_dict(model_config))
        self.learner = OnlineLearner(
            self.model,
            LearnerConfig(
                lr=self.config.lr,
                optimizer=self.config.optimizer,
                weight_decay=self.config.weight_decay,
                seed=self.config.seed,
            ),
        )

    # ---- checkpoints -----------------------------------------------------------------------------
    def _restore(self) -> str | None:

        try:
            name = self.ckpts.latest()
        except ValueError as e:
            raise TrainerError(str(e)) from e
        if name is None:
            return None
        d = self.ckpts.path(name)
        try:
            state = json.loads(self.ckpts.read(name, "state.json"))
            if state.get("format") != CKPT_FORMAT:
                raise TrainerError(f"{d}: not a {CKPT_FORMAT} checkpoint")
            self._build(None, state["model_config"], state["encoder_config"])
            self.model.load_state_dict(load(self.ckpts.read(name, "model.safetensors")))
            states = torch.load(io.BytesIO(self.ckpts.read(name, "optimizer.pt")), weights_only=True)
            if len(states) != len(self.learner.optimizers):
                raise ValueError(f"{len(states)} optimizer states for {len(self.learner.optimizers)} optimizers")
            for opt, st in zip(self.learner.optimizers, states):
                opt.load_state_dict(st)
            rng = load(self.ckpts.read(name, "rng.safetensors"))
            torch.set_rng_state(rng["torch"])
            self.learner._gen.set_state(rng["learner"])
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
            raise TrainerError(f"checkpoint {d} cannot be restored: {e}") from e
        self.position = Position.from_dict(state["position"])
        self.learned, self.digest, self.seq = state["learned"], int(state["digest"], 16), state["seq"]
        self.trained_until_ts = state.get("trained_until_ts")
        self.metrics, self.runs = state["metrics"], state.get("runs", [])
        self.last_published = state.get("last_published")
        print(
            f"[trainer] resumed from {name}: learned={self.learned} files_done={len(self.position.done)} "
            f"partial={self.position.partial}",
            flush=True,
        )
        return name

    def checkpoint(self, wait: bool = True) -> str:
        """Write a whole checkpoint, then switch ``LATEST`` to it atomically; returns its name.

        The state is taken at once (a consistent snapshot, under the lock that orders it with learning); the
        files, the ``LATEST`` switch and the registry version are written by a writer thread. With ``wait``
        this returns once they are; without, learning goes on meanwhile (the run's periodic checkpoints), and
        at most one checkpoint is in flight: the next waits for it, so versions stay in order and memory
        bounded. A write that failed raises at the next checkpoint, or here with ``wait``.
        """
        with self.times("checkpoint: snapshot"):
            with self._lock:
                job = self._snapshot()
        with self.times("checkpoint: wait for the previous write"):
            self._drain()
        if job is None:
            return ""
        self._writing = self._writer.submit(self._write, job)
        if wait:
            with self.times("checkpoint: wait for the write"):
                self._drain()
        return job["name"]

    def _drain(self) -> None:
        """Wait for the checkpoint in flight; raise its error, if it failed."""
        if self._writing is not None:
            done, self._writing = self._writing, None
            done.result()

    def _snapshot(self) -> dict[str, Any] | None:
        if self.model is None:
            return None
        metrics = self.summary_metrics()
        self.seq += 1
        name = f"ckpt-{self.seq:06d}"
        opt = io.BytesIO()
        torch.save([o.state_dict() for o in self.learner.optimizers], opt)
        weights = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        state = {
            "format": CKPT_FORMAT,
            "seq": self.seq,
            "model_config": self.model_config,
            "encoder_config": self.encoder.config.to_dict(),
            "position": self.position.to_dict(),
            "learned": self.learned,
            "digest": f"{self.digest:016x}",
            "metrics": self.metrics,
            "trained_until_ts": self.trained_until_ts,
            "summary": metrics,
            "runs": self.runs,
            "last_published": self.last_published,
            "written_at": time.time(),
            "config": asdict(self.config),
        }
        job = {
            "name": name,
            "seq": self.seq,
            "preds": pa.concat_tables(self.pending_preds) if self.pending_preds else None,
            "weights": weights,
            "files": {
                "model.safetensors": save(weights),
                "optimizer.pt": opt.getvalue(),
                "rng.safetensors": save({"torch": torch.get_rng_state(), "learner": self.learner._gen.get_state()}),
                "state.json": json.dumps(state, indent=1).encode(),
            },
            "metrics": metrics,
            "publish": bool(
                self.config.publish_every and self.config.registry_uri and self.seq % self.config.publish_every == 0
            ),
            "training_range": self._training_range(),
            "learned": self.learned,
        }
        self.pending_preds = []
        self._since_ckpt, self._ckpt_time = 0, time.monotonic()
        return job

    def _write(self, job: dict[str, Any]) -> None:
        """The writer thread: predictions, the checkpoint's files and ``LATEST``, old ones removed, the version."""
        with self.times("checkpoint: write (writer thread)"):
            # predictions first: named by checkpoint seq, so a replay after a crash overwrites, never duplicates
            if job["preds"] is not None:
                self.ckpts.write_table(job["preds"], "predictions", f"part-{job['seq']:06d}.parquet")
            self.ckpts.commit(job["name"], job["files"])
            self.ckpts.gc(keep=2)
        if job["publish"]:
            with self.times("publish (writer thread)"):
                self._publish(job["weights"], job["training_range"], job["metrics"])
        line = " ".join(f"{k}={v:.4f}" for k, v in job["metrics"].items() if k != "examples")
        print(f"[trainer] checkpoint {job['name']}: learned={job['learned']} {line}", flush=True)

    def _heartbeat(self) -> None:
        """A small progress file (pid, examples learned) for operators and crash tests; not a checkpoint."""
        self.ckpts.write(
            json.dumps({"pid": os.getpid(), "learned": self.learned, "seq": self.seq, "at": time.time()}).encode(),
            "heartbeat.json",
            durable=False,
        )

    def publish(self, metrics: dict[str, float] | None = None) -> str:
        """Publish the current weights to the registry (a candidate unless ``promote``); returns the version."""
        with self._lock:
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            training_range, metrics = self._training_range(), metrics or self.summary_metrics()
        return self._publish(weights, training_range, metrics)

    def _training_range(self) -> dict[str, Any]:
        """What the weights of this instant learned (and the lineage they continue), recorded with a version."""
        return {
            "learned": self.learned,
            "checkpoint": self.seq,
            "files_done": len(self.position.done),
            "trained_until_ts": self.trained_until_ts,
            "adopted": self.adopted,
        }

    def _publish(self, weights: dict[str, Any], training_range: dict[str, Any], metrics: dict[str, float]) -> str:
        reg = ModelRegistry(self.config.registry_uri)
        entry = reg.publish(
            weights,
            model_config=self.model_config,
            feature_service=self.config.feature_service,
            training_range={k: v for k, v in training_range.items() if k != "adopted"},
            metrics=metrics,
            extra={
                "encoder": self.encoder.config.to_dict(),
                "source": "jobs.trainer",
                "adopted": training_range["adopted"],
            },
            promote=self.config.promote,
        )
        self.last_published = entry.version
        print(f"[trainer] published {entry.version}{' (current)' if self.config.promote else ''}", flush=True)
        return entry.version

    # ---- learning --------------------------------------------------------------------------------
    def adopt(self, version: str) -> bool:
        """Continue from the weights of a promoted registry version (a retrain warm-started from this
        trainer's model: same encoder and model config), so its later checkpoints descend from what serves.
        Returns False (and changes nothing) when the version is not compatible. Callable from another thread.
        """

        entry, model = load_model(ModelRegistry(self.config.registry_uri), version)
        with self._lock:
            same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731
            if (
                self.model is None
                or not same(entry.model_config, self.model_config)
                or not same(entry.extra.get("encoder"), self.encoder.config.to_dict())
            ):
                return False
            # in place: the optimizers keep their state. Adagrad's accumulators are the scale of each weight's
            # gradients so far; fresh ones would make the first steps lr-sized (a logloss spike after each
            # promoted retrain, measured: 0.57 -> 1.2-1.9 on a slice of ML-100K)
            self.model.load_state_dict(model.state_dict())
            h = horizon_of(entry)
            if h is not None:  # what it learned is learned now too
                self.trained_until_ts = h if self.trained_until_ts is None else max(self.trained_until_ts, h)
            self.adopted = version
        print(f"[trainer] adopted the weights of {version}", flush=True)
        return True

    def learn_batch(self, table: pa.Table) -> np.ndarray:
        """Test-then-train on one mini-batch; returns the pre-update predictions."""
        with self._lock, self.times("learn"):
            return self._learn_batch(table)

    def _learn_batch(self, table: pa.Table) -> np.ndarray:
        if self.model is None:
            self._build(table)
        batch = self.encoder.encode(table)
        y = batch["label"]
        # one forward pass: the eval-mode probabilities before the update, then the sparse step
        pred = self.learner.test_then_train(batch).numpy()
        eps = 1e-7
        yn = y.numpy()
        self.metrics["n"] += len(yn)
        self.metrics["pos"] += int(yn.sum())
        self.metrics["logloss_sum"] += float(-(yn * np.log(pred + eps) + (1 - yn) * np.log(1 - pred + eps)).sum())
        self.pending_preds.append(
            pa.table(
                {
                    "event_id": table["event_id"],
                    "ts": table["ts"],
                    "label": table["label"],
                    "pred": pa.array(pred, pa.float32()),
                }
            )
        )
        self.learned += table.num_rows
        # what it knows reaches to the newest label it learned: under delayed labels that is the label's
        # arrival (label_ts), later than the impression's ts
        newest = int(table["label_ts" if "label_ts" in table.column_names else "ts"].to_numpy().max())
        self.trained_until_ts = newest if self.trained_until_ts is None else max(self.trained_until_ts, newest)
        self.digest = (self.digest + event_digest(table["event_id"].to_pylist())) % (1 << 64)
        return pred

    @staticmethod
    def _partial(before, after, rows: int, k: int):
        """The position after the first ``k`` of the ``rows`` rows of the batch that ends at ``after``."""

        path = after.partial[0] if after.partial else after.done[-1]
        end = after.partial[1] if after.partial else None
        if end is None:  # the batch ended its file: its row count is the file's
            start = before.partial[1] if before.partial and before.partial[0] == path else 0
            end = start + rows
        return Position([d for d in after.done if d != path], (path, end - rows + k))

    def summary_metrics(self) -> dict[str, float]:
        """Streaming (test-then-train) metrics over everything learned so far, plus AUC since the last checkpoint."""
        n = max(1, self.metrics["n"])
        out = {
            "examples": float(self.metrics["n"]),
            "logloss": self.metrics["logloss_sum"] / n,
            "ctr": self.metrics["pos"] / n,
        }
        if self.pending_preds:
            t = pa.concat_tables(self.pending_preds)
            y, p = t["label"].to_numpy(), t["pred"].to_numpy()
            if 0 < y.sum() < len(y):
                out["auc_recent"] = float(roc_auc_score(y, p))
        return out

    def _due(self) -> bool:
        free = self.config.free_examples
        if free and self.seq == 0:  # the first checkpoint (the bootstrap model) comes at the end of the warm-up
            return self.learned >= free
        return (
            self._since_ckpt >= self.config.checkpoint_every
            or time.monotonic() - self._ckpt_time >= self.config.checkpoint_seconds
        )

    def stop(self) -> None:
        """Ask :meth:`run` to checkpoint and return after the current batch (callable from another thread)."""
        self._stop.set()
        self._wake.set()

    def allow(self, examples: int, still: bool = False) -> None:
        """The serving clock: learn at most ``examples`` examples in all (those whose labels have arrived,
        i.e. that serving has already scored), beyond the ``free_examples`` warm-up. Callable from another
        thread; only ever raises the bound.

        ``still``: the clock will not move until this trainer learns (serving is waiting for it), so a
        part-batch up to the bound is learned now instead of after a poll of standing still: the same step,
        without the wait.
        """
        previous = self.allowed
        self.allowed = examples if self.allowed is None else max(self.allowed, examples)
        if self.allowed != previous:
            self._allowed_at = time.monotonic()
            self._wake.set()
        if still:
            self._allowed_at = time.monotonic() - self.config.poll_seconds
            self._wake.set()

    def _settle(self, seconds: float) -> None:
        """A part-batch waits for the clock to stand still this long, or until told it does (:meth:`allow`)."""
        with self.times("wait: a part-batch settles"):
            self._wake.wait(seconds)
        self._wake.clear()

    def _bound(self) -> int | None:
        if self.allowed is None and self.config.free_examples is None:
            return None
        return max(self.allowed or 0, self.config.free_examples or 0)

    def status(self) -> dict[str, Any]:
        return {
            "learned": self.learned,
            "seq": self.seq,
            "trained_until_ts": self.trained_until_ts,
            "position": self.position.to_dict(),
            "last_published": self.last_published,
            **self.summary_metrics(),
        }

    def run(self) -> dict[str, Any]:
        """Consume examples until stopped, idle for ``idle_exit`` s, or ``max_examples`` learned this run."""
        cfg = self.config
        learned_this_run, idle_since = 0, time.monotonic()
        started = time.perf_counter()
        while not self._stop.is_set():
            got = False
            settle = 0.0  # > 0: a part-batch waits this long for the clock to stand still
            for table, pos in self.store.batches(self.position, cfg.batch_size):
                bound = self._bound()
                if bound is not None and self.learned + table.num_rows > bound:
                    # learn up to the bound exactly; the rest comes with the clock. A part-batch only once the
                    # clock has stood still for a poll: the clock moves in small steps, and a step on every
                    # few rows (at the optimizer's rate for a whole batch) makes a noisy, miscalibrated model
                    settle = cfg.poll_seconds - (time.monotonic() - self._allowed_at)
                    if self.learned < bound and settle <= 0:
                        k = bound - self.learned
                        head = table.slice(0, k)
                        self.learn_batch(head)
                        self.position = self._partial(self.position, pos, table.num_rows, k)
                        got = True
                        learned_this_run += k
                        self._since_ckpt += k
                        self._heartbeat()
                        if self._due():
                            self.checkpoint(wait=False)
                    break  # wait for the serving clock
                self.learn_batch(table)
                self.position = pos
                got = True
                learned_this_run += table.num_rows
                self._since_ckpt += table.num_rows
                self._heartbeat()
                if self._due():
                    self.checkpoint(wait=False)
                if cfg.throttle_seconds:
                    time.sleep(cfg.throttle_seconds)
                if self._stop.is_set() or (cfg.max_examples and learned_this_run >= cfg.max_examples):
                    self._stop.set()
                    break
            if got:
                idle_since = time.monotonic()
                if settle > 0:
                    self._settle(settle)
            elif cfg.idle_exit is not None and time.monotonic() - idle_since >= cfg.idle_exit:
                break
            else:
                if self._since_ckpt and time.monotonic() - self._ckpt_time >= cfg.checkpoint_seconds:
                    self.checkpoint(wait=False)
                if settle > 0:
                    self._settle(settle)
                else:  # new examples are polled for; a raised serving clock wakes the wait at once
                    with self.times("wait: serving clock or new examples"):
                        self._wake.wait(cfg.poll_seconds)
                    self._wake.clear()
        if self._since_ckpt or self.seq == 0:
            self.checkpoint()
        with self.times("checkpoint: wait for the write"):
            self._drain()  # the run's last checkpoint is on disk (and published) when it returns
        spent = sum(self.times.as_dict().values())
        self.times.add("read examples, other", max(0.0, time.perf_counter() - started - spent))
        return {**self.status(), "seconds": self.times.as_dict()}


def read_checkpoint_state(checkpoint_dir: str) -> dict[str, Any] | None:
    """The ``state.json`` of the latest checkpoint (position, learned, digest, metrics), or None."""
    store = CheckpointStore(checkpoint_dir)
    name = store.latest()
    return None if name is None else json.loads(store.read(name, "state.json"))


# ---- command line / Ray binding -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[TrainerConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m jobs.trainer", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="reloop YAML config (defaults for the paths below)")
    p.add_argument("--examples", help="example store URI (default: storage.examples_uri)")
    p.add_argument("--checkpoint-dir", help="local checkpoint directory (default: <state>/trainer)")
    p.add_argument("--registry", help="registry URI (default: storage.registry_uri)")
    p.add_argument(
        "--feature-service", default=None, help="Feast feature service (default: ctr_<model>_v<feature-set version>)"
    )
    # model and optimizer: the config's trainer section unless given here
    p.add_argument("--model", default=None, choices=list(KINDS))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--optimizer", default=None, choices=["adagrad", "adam", "sgd"])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--checkpoint-every", type=int, default=5000, help="examples between checkpoints")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0)
    p.add_argument("--publish-every", type=int, default=0, help="checkpoints between registry versions (0: never)")
    p.add_argument("--promote", action="store_true", help="make each published version current")
    p.add_argument("--idle-exit", type=float, default=None, help="exit after S seconds without new examples")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--throttle", type=float, default=0.0, help="seconds to pause after each batch")
    p.add_argument("--address", default=None, help="Ray address (default: the job's cluster, or a local ray.init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--side-tables",
        default=None,
        help="side features: directory/URI of the user_profile/item_catalog batch sources (e.g. the Feast repo's "
        "data/offline, written by `reloop side-tables`; the default when the config's trainer.side_features is true)",
    )
    a = p.parse_args(argv)

    cfg = load_config(a.config)
    if a.side_tables is None and cfg.trainer.side_features:  # the Feast repo's batch sources (reloop side-tables)
        a.side_tables = feast_batch_root(cfg.feast)
    examples = a.examples or cfg.storage.examples_uri
    registry = a.registry or cfg.storage.registry_uri
    ckpt = a.checkpoint_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.storage.examples_uri)), "trainer")
    tc = TrainerConfig(
        examples_uri=examples,
        checkpoint_dir=ckpt,
        registry_uri=registry,
        feature_service=a.feature_service,
        model_kind=a.model or cfg.model.kind,
        hash_buckets=cfg.model.hash_buckets,
        architecture=cfg.model.architecture(),
        batch_size=a.batch_size or cfg.trainer.batch_size,
        lr=a.lr or cfg.trainer.lr,
        optimizer=a.optimizer or cfg.trainer.optimizer,
        weight_decay=cfg.trainer.weight_decay,
        checkpoint_every=a.checkpoint_every,
        checkpoint_seconds=a.checkpoint_seconds,
        publish_every=a.publish_every,
        promote=a.promote,
        idle_exit=a.idle_exit,
        max_examples=a.max_examples,
        throttle_seconds=a.throttle,
        seed=a.seed,
        side_tables_uri=a.side_tables,
    )
    return tc, a


def main(argv: list[str] | None = None) -> int:
    import ray  # here, not at the top: Ray reads its auth settings when its core library loads (see reloop.run)

    tc, a = parse_args(argv)
    in_job = bool(os.environ.get("RAY_ADDRESS")) or a.address is not None
    if in_job:
        ray.init(address=a.address)  # inside `ray job submit`: RAY_ADDRESS points at the cluster
    else:
        init_local(num_cpus=2)
    try:
        # max_concurrency=2: stop()/status() can be called while run() is busy
        actor = ray.remote(num_cpus=1, max_concurrency=2, max_restarts=0)(IncrementalTrainer).remote(tc)
        result = ray.get(actor.run.remote())
        print("[trainer] done: " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
