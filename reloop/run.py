"""``reloop run``: the whole loop on one machine, on the embedded defaults or a real deployment.

Five stages run concurrently, each on the real service:

=============  ==========================================================================
replay         the dataset into Kafka in event-time order (``reloop.replay``)
features       the Beam feature job, one micro-batch every few seconds (``pipelines.feature_job``):
               parse / dead-letter, windowed features into Feast, training examples to Parquet
trainer        the incremental trainer, a long-lived Ray actor (``jobs.trainer``): test-then-train
               on every example whose label has arrived (that serving has scored), a checkpoint
               and a registry version every ``--refresh-every`` examples
live           the serving path (``reloop.live`` driving ``jobs.scoring``): score each new example
               with the current version plus the error-compensation memory, write its outcome into
               the memory, publish it on the predictions topic, feed the drift monitors
deployer       ``jobs.deploy``: every trainer checkpoint, retrain candidate and rollback goes through
               one paired gate on the newest events neither model learned from; retrain on Ray
               (warm and cold starts) when the policy asks; the live path swaps and rebuilds memory
=============  ==========================================================================

**One causal clock.** At full replay speed the stages behave as in real time: the trainer learns only
examples serving has passed (beyond the bootstrap warm-up), serving runs at most ``max_lag`` examples
ahead of the trainer, and a version serves an event only if its ``trained_until_ts`` (the newest event
time it learned) is earlier; a version whose horizon is not yet passed waits, and a violation stops
the run (:class:`jobs.scoring.CausalityError`). Every version records ``trained_until_ts`` and
``first_served_ts``; freshness (how far behind each served event the served version's horizon lies, in
events and event-time seconds) is in the summary.

Every run has an id; its topics (``<events_topic>.<run id>``), consumer group,
example store, trainer checkpoints, registry and audit log are its own, under
``.state/runs/<run id>`` (the storage URIs of the config). Ctrl-C stops every
stage cleanly: the feature job finishes its micro-batch and commits, the
trainer checkpoints, the live state is saved; ``reloop run --resume`` goes on
from there. At the end the report (``report.html``, PNGs, ``summary.json``)
is written to ``reports/<run id>``.


Each run gets its own topics, consumer group and stores (``run_config``)::

>>> from pathlib import Path
>>> from reloop.config import ReloopConfig
>>> c = run_config(ReloopConfig(), "r1", Path("/tmp/reloop-doc/runs/r1"))
>>> c.kafka.consumer_group, c.kafka.dlq_topic
('reloop-features.r1', 'reloop.events.dlq.r1')
"""

from __future__ import annotations

import json
import os
import posixpath
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.live import Live
from rich.table import Table

from features.windows import feature_service_name, parse_duration_ms
from jobs.deploy import DeployConfig, Deployer
from jobs.examples import Position
from jobs.monitor import build_loop, load_state, save_state
from jobs.ray_local import init_local
from jobs.registry import ModelRegistry
from jobs.timing import StageTimes
from jobs.trainer import IncrementalTrainer, TrainerConfig
from online_models.cbpe import estimate_over_time
from online_models.drift.incidents import group_incidents
from online_models.errors import ReloopError
from online_models.metrics import auc
from pipelines.consumer_group import partition_offsets
from pipelines.feature_job import run_join_once, run_once
from pipelines.kafka_io import end_offsets, ensure_topics, read_range
from pipelines.side_features import SIDE_BAGS, SIDE_CATEGORICAL, side_source, write_side_tables
from pipelines.storage import open_filesystem, storage_env
from reloop import services
from reloop.config import ReloopConfig
from reloop.datasets import MOVIELENS_100K, load_dataset
from reloop.inject import inject_drift
from reloop.live import DelayedServingLoop, PredictionLog, ServingLoop
from reloop.replay import replay_delayed, replay_table
from reloop.report import RunRecord, Series, freshness, write_report
from reloop.runners import runner_args, start_local_flink
from reloop.side_tables import load_side_tables
from reloop.synthetic import SyntheticError, parse_delay


class RunError(ReloopError, RuntimeError):
    """The run cannot start or continue (bad options, nothing to resume, a stage failed)."""


#: the options a resumed run takes from the run it continues (the stream must be the same one)
RESUMED = (
    "dataset",
    "model",
    "limit",
    "inject_drift",
    "drift_at",
    "seed",
    "label_delay",
    "attribution_window",
    "side_features",
    "users_path",
    "items_path",
)


@dataclass
class RunOptions:
    dataset: str = "movielens-100k"
    #: None (here and below): the config's ``trainer`` / ``gate`` section (jobs.config)
    model: str | None = None
    speed: float | None = None  # None: as fast as possible; else N x real time
    limit: int | None = None
    inject_drift: str | None = None
    drift_at: float = 0.6
    resume: bool = False
    run_id: str | None = None
    feature_every_s: float = 3.0
    holdout: int = 1000  # newest served events kept out of a retrain (its gate events)
    refresh_every: int | None = None  # examples between checkpoints offered to serving (see bench_refresh_cadence)
    bootstrap: int | None = None  # examples the first model learns before it serves (never scored)
    gate_events: int | None = None  # the newest paired events the gate decides on
    gate_level: float | None = None  # the gate's two-sided interval (each end a one-sided 95 % bound)
    gate_margin: float | None = None  # a retrain must beat the served logloss by this fraction (and the test)
    retrain_window: int = 20_000  # at most this many events before the holdout are trained on
    retrain_min_rows: int = 3000  # wait for this many events after the drift began before retraining
    retrain_lookback: int = 1000  # the drift is taken to have begun this many events before detection
    refresh: bool = True  # promote the incremental trainer's checkpoints through the gate
    max_lag: int = 1000  # how far (examples) serving may run ahead of the trainer
    report_root: str = "reports"
    state_root: str = ".state/runs"
    progress: bool = True
    seed: int = 0
    #: None: the config's ``memory`` section (defaults: online_models.settings.SERVING_MEMORY)
    memory: dict[str, Any] | None = None
    #: contract v2: replay impressions and each click this much later (``exp:20m``; see reloop.synthetic);
    #: the feature job joins them in ``attribution_window`` (None: the config's feature_job section)
    label_delay: str | None = None
    attribution_window: str | None = None
    train_batch: int | None = None  # the incremental trainer's mini-batch (test-then-train steps)
    #: side features: the dataset's user profile and item catalogue (ML-100K: from the wheel; else the CSVs
    #: below, columns in reloop.side_tables), written under the run's state as the batch sources of Feast's
    #: user_profile / item_catalog and joined point in time by the trainer, the retrains and serving.
    #: None: the config's trainer.side_features
    side_features: bool | None = None
    users_path: str | None = None
    items_path: str | None = None


# ----------------------------------------------------------------------------------------------------
# run layout


def latest_run(root: Path) -> str | None:
    runs = sorted(p.name for p in root.glob("*") if (p / "run.json").exists())
    return runs[-1] if runs else None


def run_config(cfg: ReloopConfig, run_id: str, state: Path) -> ReloopConfig:
    """The config of one run: its own topic suffix, consumer group and storage under the run directory."""

    def under(uri: str, name: str) -> str:
        return str(state / name) if "://" not in uri else posixpath.join(uri, "runs", run_id, name)

    return cfg.model_copy(
        update={
            "kafka": cfg.kafka.model_copy(
                update={
                    "consumer_group": f"{cfg.kafka.consumer_group}.{run_id}",
                    "dlq_topic": f"{cfg.kafka.dlq_topic}.{run_id}",
                    "impressions_topic": f"{cfg.kafka.impressions_topic}.{run_id}",
                    "feedback_topic": f"{cfg.kafka.feedback_topic}.{run_id}",
                }
            ),
            "storage": cfg.storage.model_copy(
                update={
                    "examples_uri": under(cfg.storage.examples_uri, "examples"),
                    "registry_uri": under(cfg.storage.registry_uri, "registry"),
                    "trainer_uri": under(cfg.storage.trainer_uri, "trainer"),
                }
            ),
            "feature_job": cfg.feature_job.model_copy(
                update={"state_uri": under(cfg.feature_job.state_uri, "feature_state")}
            ),
            "hooks": cfg.hooks.model_copy(update={"dead_letter_path": str(state / "alerts.deadletter.jsonl")}),
            "drift": cfg.drift.model_copy(
                update={
                    "state_path": str(state / "monitor" / "state.json"),
                    "audit_log_path": str(state / "monitor" / "audit.jsonl"),
                }
            ),
        }
    )


def _sibling(uri: str, name: str) -> str:
    """``name`` beside ``uri``'s last component: a local path or an object-store URI."""
    if "://" in uri:
        return posixpath.join(posixpath.dirname(uri.rstrip("/")), name)
    return str(Path(uri).parent / name)


def _trainer_predictions(trainer_dir: str) -> dict[str, np.ndarray]:
    """The incremental trainer's test-then-train log: event_id, ts, label, pred (before each update)."""

    # a local directory or an object-store URI (the cluster profile keeps the trainer's log in the bucket)
    fs, root, local = open_filesystem(trainer_dir)
    d = os.path.join(root, "predictions") if local else posixpath.join(root, "predictions")
    infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
    )
    if not files:
        return {"event_id": np.zeros(0, object), "ts": np.zeros(0, np.int64), "label": np.zeros(0), "pred": np.zeros(0)}
    t = ds.dataset(files, format="parquet", filesystem=fs).to_table()
    # a crash can make the trainer re-log a batch under a new name: keep the last prediction per event
    ids = t["event_id"].to_numpy(zero_copy_only=False).astype(object)
    _, last = np.unique(ids[::-1], return_index=True)
    keep = np.sort(len(ids) - 1 - last)
    t = t.take(pa.array(keep)).sort_by("ts")
    return {
        "event_id": t["event_id"].to_numpy(zero_copy_only=False).astype(object),
        "ts": t["ts"].to_numpy(),
        "label": t["label"].to_numpy().astype(float),
        "pred": t["pred"].to_numpy().astype(float),
    }


# ----------------------------------------------------------------------------------------------------
# the run


@dataclass
class Counters:
    """Live numbers of every stage (read by the progress display and the summary)."""

    replayed: int = 0
    replay_seconds: float = 0.0
    records_read: int = 0
    events_parsed: int = 0
    dead_lettered: int = 0
    accepted: int = 0
    late: int = 0
    duplicates: int = 0
    examples_written: int = 0
    feature_runs: int = 0
    feature_seconds: float = 0.0
    learned: int = 0
    trainer_seconds: float = 0.0
    scored: int = 0
    alerts: int = 0
    version: str | None = None


class LoopRun:
    """One ``reloop run`` (see the module docstring). ``run()`` returns the summary dict."""

    def __init__(self, cfg: ReloopConfig, opts: RunOptions) -> None:
        if opts.memory is None:
            opts.memory = cfg.memory.settings()
        for field, value in (
            ("model", cfg.model.kind),
            ("train_batch", cfg.trainer.batch_size),
            ("refresh_every", cfg.trainer.refresh_every),
            ("bootstrap", cfg.trainer.bootstrap),
            ("gate_events", cfg.gate.events),
            ("gate_level", cfg.gate.level),
            ("gate_margin", cfg.gate.margin),
            ("side_features", cfg.trainer.side_features or bool(opts.users_path or opts.items_path)),
        ):
            if getattr(opts, field) is None:
                setattr(opts, field, value)
        self.base_cfg, self.opts = cfg, opts
        root = Path(opts.state_root)
        if opts.resume:
            run_id = opts.run_id or latest_run(root)
            if run_id is None or not (root / run_id / "run.json").exists():
                raise RunError(f"nothing to resume under {root}" + (f" (no run {opts.run_id})" if opts.run_id else ""))
            saved = json.loads((root / run_id / "run.json").read_text())
            for k in RESUMED:
                if k in saved["options"]:
                    setattr(opts, k, saved["options"][k])
        else:
            run_id = opts.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
        self.run_id = run_id
        self.state = (root / run_id).resolve()
        self.state.mkdir(parents=True, exist_ok=True)
        self.cfg = run_config(cfg, run_id, self.state)
        self.topic = f"{cfg.kafka.events_topic}.{run_id}"
        #: contract v2: impressions + delayed clicks, joined by the feature job in the attribution window
        self.delayed = opts.label_delay not in (None, "none")
        if self.delayed:
            self._delayed_setup()
        self.topics = (
            [self.cfg.kafka.impressions_topic, self.cfg.kafka.feedback_topic] if self.delayed else [self.topic]
        )
        self.report_dir = Path(opts.report_root) / run_id
        self.stop = threading.Event()
        self.replay_done = threading.Event()
        self.features_done = threading.Event()
        self.c = Counters()
        self.errors: list[str] = []
        self.shift: dict[str, Any] | None = None
        self.alerts: list[dict[str, Any]] = []
        self.live = None
        self.interrupted = False
        self.committed: int | None = None
        self.dataset_rows = 0
        self.predictions = None
        self.trainer = None
        self.join_counts: dict[str, int] = {}  # the attribution join's counters, summed over micro-batches
        self.live_times = StageTimes()  # the serving thread's time budget (the trainer keeps its own)
        self.trainer_times: dict[str, float] = {}
        #: side features: where the run's side tables are (its trainer, retrains and serving join them)
        self.side_uri = _sibling(self.cfg.storage.examples_uri, "side_tables") if opts.side_features else None
        self.side_rows: dict[str, int] = {}
        if opts.side_features and opts.dataset != MOVIELENS_100K and not (opts.users_path or opts.items_path):
            raise RunError(
                f"--side-features: {opts.dataset} has no side tables of its own; give --users and/or --items"
            )
        self.t0 = time.time()
        if not opts.resume:
            (self.state / "run.json").write_text(
                json.dumps(
                    {
                        "run_id": run_id,
                        "created": time.time(),
                        "topic": self.topic,
                        "options": {k: getattr(opts, k) for k in RESUMED},
                    },
                    indent=2,
                )
            )

    def _delayed_setup(self) -> None:
        """Check ``--label-delay`` / ``--attribution-window`` before anything starts; the window goes into the
        run's feature_job section (the join reads it there)."""

        try:
            parse_delay(self.opts.label_delay)
        except SyntheticError as e:
            raise RunError(f"--label-delay: {e}") from None
        fj = self.cfg.feature_job
        if self.opts.attribution_window is not None:
            try:
                window_s = parse_duration_ms(self.opts.attribution_window) / 1000.0
            except ValueError as e:
                raise RunError(f"--attribution-window: {e}") from None
            if window_s <= 0:
                raise RunError("--attribution-window must be positive")
            fj = fj.model_copy(update={"attribution_window_s": window_s})
            self.cfg = self.cfg.model_copy(update={"feature_job": fj})
        self.window_ms = int(fj.attribution_window_s * 1000)

    # -- stages -------------------------------------------------------------------------------------
    def _guard(self, name: str, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - a failed stage stops the run with its reason
            self.errors.append(f"{name}: {type(e).__name__}: {e}")
            self.stop.set()

    def _load_table(self) -> pa.Table:

        table = load_dataset(self.opts.dataset, limit=self.opts.limit)
        if self.opts.inject_drift:
            table, shift = inject_drift(table, self.opts.inject_drift, at=self.opts.drift_at, seed=self.opts.seed)
            self.shift = shift.to_dict()
        return table

    def _on_topic(self, topic: str, key: str) -> set[str]:
        """The ids (``key`` of each JSON record) a topic already holds: a resumed run does not send them again."""

        have: set[str] = set()
        for part, end in end_offsets(self.cfg.kafka, topic).items():
            for _, _, v in read_range(self.cfg.kafka, topic, part, 0, end):
                try:
                    have.add(json.loads(v)[key])
                except (ValueError, KeyError, TypeError):
                    pass
        return have

    def _replay(self, table: pa.Table) -> None:

        if self.delayed:
            k = self.cfg.kafka
            skip = (
                (
                    self._on_topic(k.impressions_topic, "impression_id"),
                    self._on_topic(k.feedback_topic, "impression_id"),
                )
                if self.opts.resume
                else None
            )
            self.c.replayed = len(skip[0]) if skip else 0
            stats = replay_delayed(
                table, k, self.opts.label_delay, seed=self.opts.seed, speed=self.opts.speed, skip=skip
            )
            self.c.replayed += stats.impressions.events
            self.c.replay_seconds += stats.impressions.seconds
            self.replay_done.set()
            return
        if self.opts.resume:
            # what the topic already holds is not sent again (replay is idempotent per event id)
            have = self._on_topic(self.topic, "event_id")
            self.c.replayed = len(have)
            if have:
                table = table.filter(pa.array([e not in have for e in table["event_id"].to_pylist()]))
        if table.num_rows:
            stats = replay_table(table, self.cfg.kafka, topic=self.topic, speed=self.opts.speed)
            self.c.replayed += stats.events
            self.c.replay_seconds += stats.seconds
        self.replay_done.set()

    def _features(self) -> None:

        fj = self.cfg.feature_job
        # feature_job.runner "flink": the local job server (started if down) or --flink_master's cluster
        args = runner_args(fj.runner, list(fj.pipeline_args), start_local_flink)
        while not self.stop.is_set():
            started = time.monotonic()
            replay_finished = self.replay_done.is_set()
            if self.delayed:
                s = run_join_once(self.cfg, pipeline_args=args or None)
                for k, v in s.join.items():
                    self.join_counts[k] = self.join_counts.get(k, 0) + v
            else:
                s = run_once(self.cfg, topic=self.topic, pipeline_args=args or None)
            if s.committed:
                # events after a partition's time-aligned cut are read again by the next micro-batch: count
                # each event once (deferred ones and the rejections among them are not done yet)
                unfinished = s.deferred + (s.rejected - s.dead_lettered)
                self.c.records_read += s.records_read - unfinished
                self.c.events_parsed += s.events_parsed - s.deferred
                for name in ("dead_lettered", "accepted", "late", "duplicates", "examples_written"):
                    setattr(self.c, name, getattr(self.c, name) + getattr(s, name))
                self.c.feature_runs += 1
                self.c.feature_seconds += s.seconds
            elif replay_finished:
                break  # the replay had finished before this run began and nothing new came: done
            self.stop.wait(max(0.0, self.opts.feature_every_s - (time.monotonic() - started)))
        self.features_done.set()

    def _trainer_config(self):

        return TrainerConfig(
            examples_uri=self.cfg.storage.examples_uri,
            checkpoint_dir=self.cfg.storage.trainer_uri,
            registry_uri=self.cfg.storage.registry_uri,
            model_kind=self.opts.model,
            hash_buckets=self.cfg.model.hash_buckets,
            architecture=self.cfg.model.architecture(),
            # a checkpoint, and a version offered to serving, every `refresh_every` examples
            # (by count, not seconds: the cadence is a property of the stream, not the machine);
            # the first after the bootstrap warm-up, learned before the serving clock binds
            checkpoint_every=self.opts.refresh_every,
            checkpoint_seconds=1e9,
            publish_every=1,
            promote=False,
            poll_seconds=0.2,
            seed=self.opts.seed,
            free_examples=self.opts.bootstrap,
            side_tables_uri=self.side_uri,
            batch_size=self.opts.train_batch,
            optimizer=self.cfg.trainer.optimizer,
            lr=self.cfg.trainer.lr,
            weight_decay=self.cfg.trainer.weight_decay,
        )

    def _write_side_tables(self) -> None:
        """The dataset's side tables as the run's batch sources (what Feast's user_profile / item_catalog read),
        before any stage reads an example; a resumed run writes the same file again."""
        users, items = load_side_tables(self.opts.dataset, self.opts.users_path, self.opts.items_path)
        if users is None and items is None:
            raise RunError(
                f"--side-features: {self.opts.dataset} has no side tables of its own; give --users and/or --items"
            )
        self.side_rows = write_side_tables(self.side_uri, users, items, self.run_id)

    def _heartbeat_learned(self) -> int:
        """The trainer's progress from its heartbeat file (written after every batch): a local read, so the
        serving clock and the trainer follow each other without a Ray round trip per step."""
        try:
            return int(json.loads((self.state / "trainer" / "heartbeat.json").read_text())["learned"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _live(self, live, deployer) -> None:
        times = self.live_times
        told_still = False  # the trainer knows serving waits for it (the clock stands still until it learns)
        while not self.stop.is_set():
            if deployer.pending is not None and self.opts.speed is None:
                # at full replay speed a 30-60 s retrain would let months of event time pass; in real time it
                # is a blink. The stream waits for it, so the report's time axis stays true.
                with times("wait: a retrain (the stream is held)"):
                    deployer.tick()
                    self.stop.wait(0.3)
                continue
            # serve at most `max_lag` examples ahead of what the trainer has learned: at full replay speed
            # the stream would otherwise outrun training entirely, which no real-time deployment sees
            self.c.learned = max(self.c.learned, self._heartbeat_learned())
            trainer_done = self.features_done.is_set() and self.c.learned >= self.c.examples_written
            budget = None if trainer_done else self.c.learned + self.opts.max_lag - live.passed
            if self.delayed:
                live.final = self.features_done.is_set()  # the join has emitted all it will: run to the end
            swapping = live.swap_seconds
            with times("serve: read + score + memory"):
                n = live.step(max_batches=8, max_rows=budget)
            swapped = live.swap_seconds - swapping  # a version swap inside the step: the memory's rebuild
            times.add("serve: read + score + memory", -swapped)
            times.add("swap a version in (memory rebuild)", swapped)
            if n and self.trainer is not None:
                self.trainer.allow.remote(live.passed)  # the serving clock moved: the trainer may follow
                told_still = False
            with times("deploy: registry, gate"):
                deployer.tick()
            self.c.scored = live.scored
            self.c.version = live.served.version if live.served else None
            if n == 0:
                caught_up = self.features_done.is_set() and self.c.learned >= self.c.examples_written
                if caught_up and deployer.requested is not None and not live.has_pending():
                    deployer.requested = None  # the stream ended before enough post-drift data arrived
                    deployer._log("retrain dropped: the stream ended first")
                if caught_up and deployer.pending is None and deployer.requested is None and not live.has_pending():
                    deployer.flush()  # a checkpoint waiting for gate events is decided on what exists
                    break
                # waiting for the trainer (its heartbeat is a local file): look again soon; for new examples
                # (a store listing, a LIST request on an object store) less often
                if budget is not None and budget <= 0:
                    if not told_still and self.trainer is not None:
                        # nothing moves until the trainer learns: its part-batch need not wait to settle
                        self.trainer.allow.remote(live.passed, still=True)
                        told_still = True
                    with times("wait: the trainer (serving is max_lag ahead)"):
                        self.stop.wait(0.02)
                else:
                    with times("wait: new examples or the first version"):
                        self.stop.wait(0.1)

    # -- the whole run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every stage to the end of the stream (or a stop signal); returns the summary.

        On the embedded profile the local broker is started if it is down, and stopped again at the end
        (one that was already up is left running): a run leaves no process behind.
        """

        own_broker = None
        if self.cfg.kafka.bootstrap_servers == services.KAFKA_BOOTSTRAP:
            broker = services.get("kafka")
            own_broker = None if broker.status().running else broker
            broker.start()
        try:
            return self._run()
        finally:
            if own_broker is not None:
                own_broker.stop()

    def _run(self) -> dict[str, Any]:
        # Ray reads its auth mode and token when its core library loads, and the cluster profile sets them
        # after this module is imported: Ray is imported here, at the start of the run, not at the top
        import ray

        # the serving thread's forward passes and memory rebuilds are small ops: one intra-op thread, as the
        # trainer actor (a second one spins on a core the trainer, the feature job or the broker holds)
        torch.set_num_threads(1)
        if not self.opts.resume:
            for topic in self.topics:
                if sum(end_offsets(self.cfg.kafka, topic).values()):
                    raise RunError(
                        f"run id {self.run_id!r} is taken: topic {topic} already holds events; choose "
                        f"another --run-id, or --resume it"
                    )
        ensure_topics(self.cfg.kafka, [*self.topics, self.cfg.kafka.dlq_topic, self.cfg.kafka.alerts_topic])
        table = self._load_table()
        self.dataset_rows = table.num_rows
        if self.side_uri is not None:
            self._write_side_tables()
        registry = ModelRegistry(self.cfg.storage.registry_uri)
        side = side_source(self.side_uri)
        if self.delayed:
            live = self.live = DelayedServingLoop(
                self.cfg.storage.examples_uri, registry, self.opts.memory, window_ms=self.window_ms, side=side
            )
        else:
            live = self.live = ServingLoop(self.cfg.storage.examples_uri, registry, self.opts.memory, side=side)
        o = self.opts
        deployer = Deployer(
            registry,
            live,
            DeployConfig(
                examples_uri=self.cfg.storage.examples_uri,
                registry_uri=self.cfg.storage.registry_uri,
                work_dir=str(self.state),
                model=o.model,
                hash_buckets=self.cfg.model.hash_buckets,
                architecture=self.cfg.model.architecture(),
                seed=o.seed,
                memory=o.memory,
                refresh=o.refresh,
                gate_events=o.gate_events,
                gate_min_events=max(100, o.gate_events // 2),
                gate_level=o.gate_level,
                gate_margin=o.gate_margin,
                retrain_window=o.retrain_window,
                retrain_min_rows=o.retrain_min_rows,
                retrain_lookback=o.retrain_lookback,
                holdout=o.holdout,
                ray_train_uri=_sibling(self.cfg.storage.trainer_uri, "ray_train"),
                retrain_workers=self.cfg.ray.retrain_workers,
                retrain_placement=self.cfg.ray.retrain_placement,
                side_tables_uri=self.side_uri,
            ),
        )
        deployer.t0 = live.t0 = self.t0
        try:  # the scored predictions, as a log on Kafka that `reloop monitor` can read
            ensure_topics(self.cfg.kafka, [self.cfg.drift.predictions_topic])
            live.publish = self.predictions = PredictionLog(
                self.cfg.kafka, self.cfg.drift.predictions_topic, self.run_id, tuple(self.cfg.drift.features)
            )
        except Exception as e:  # noqa: BLE001 - the in-process monitors still see every prediction
            self.errors.append(f"predictions topic: {e!r}")
        live.mark_ts = self.shift["start_ts"] if self.shift else None
        monitor = build_loop(self.cfg, actions=deployer, on_request=self._on_request(live))
        deployer.monitor = live.monitor = monitor
        if self.opts.resume:
            self._load_live(live, monitor)

        # Ray workers on other nodes reach s3:// storage with the driver's object-store settings
        env_vars = {**storage_env(), "PYTHONPATH": os.getcwd()}
        if self.cfg.ray.address:
            ray.init(address=self.cfg.ray.address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
        else:
            init_local(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": env_vars})
        deployer.start_retrain_worker()  # its start-up overlaps the stream, not the first drift's wait
        trainer = ray.remote(num_cpus=1, max_concurrency=2, resources=dict(self.cfg.ray.trainer_resources) or None)(
            IncrementalTrainer
        ).remote(self._trainer_config())
        self.trainer = trainer
        # a promoted warm retrain becomes the trainer's starting point: one lineage, refreshed as before
        deployer.on_promoted = lambda version: trainer.adopt.remote(version)
        trainer_run = trainer.run.remote()
        threads = [
            threading.Thread(target=self._guard, args=(name, fn), name=name, daemon=True)
            for name, fn in (
                ("replay", lambda: self._replay(table)),
                ("features", self._features),
                ("live", lambda: self._live(live, deployer)),
            )
        ]
        progress = _Progress(self) if self.opts.progress else None
        # our own handlers (after ray.init, which installs some): Ctrl-C or SIGTERM asks every stage to stop
        # at its next safe point, whatever thread the signal lands in
        previous = {sig: signal.signal(sig, self._interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            # the replay and the feature job need no trainer: they run while its actor starts (it imports torch
            # and restores its checkpoint first, 10-30 s on 2 busy cores); serving starts once it is up
            for t in threads[:2]:
                t.start()
            try:
                ray.get(trainer.status.remote(), timeout=300)
            except Exception as e:  # noqa: BLE001
                self.stop.set()
                for t in threads[:2]:
                    t.join()
                raise RunError(f"the trainer actor did not start: {e!r}") from e
            threads[2].start()
            while any(t.is_alive() for t in threads):
                try:
                    # the serving clock: the trainer learns only examples whose labels have arrived, i.e.
                    # that serving has already scored (beyond the bootstrap warm-up it learns freely)
                    trainer.allow.remote(live.passed)
                    st = ray.get(trainer.status.remote(), timeout=30)
                    self.c.learned = st["learned"]
                except ray.exceptions.GetTimeoutError:
                    pass  # busy machine: ask again next time
                except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as e:
                    # a lost node or Ray's memory monitor: the run ends with the reason, not a traceback
                    self.errors.append(f"trainer died: {str(e)[:500]}")
                    self.stop.set()
                if progress:
                    progress.update(total=table.num_rows)
                if self.features_done.is_set() and self.c.learned >= self.c.examples_written:
                    ray.get(trainer.stop.remote())  # idempotent; lets the live stage see the final version
                time.sleep(0.5)
            for t in threads:
                t.join()
        finally:
            self.stop.set()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            try:
                ray.get(trainer.stop.remote())
                final = ray.get(trainer_run)
                self.c.learned = final["learned"]
                self.trainer_times = final.get("seconds", {})
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"trainer: {e!r}")
            deployer.close(wait=not self.interrupted)
            if self.predictions is not None:
                try:
                    self.predictions.close()
                except Exception as e:  # noqa: BLE001
                    self.errors.append(f"predictions topic: {e!r}")
            monitor.dispatcher.close()  # deliver queued alerts, close the alerts producer before the broker stops
            ray.shutdown()
            if progress:
                progress.close()
        self.c.trainer_seconds = time.time() - self.t0
        self.committed = self._committed_offsets()
        self._save_live(live, monitor)
        return self._report(live, deployer)

    def _committed_offsets(self) -> int | None:
        """Events the feature job has finished, from the consumer group's committed offsets (an independent
        count from the job's own counters)."""

        total = 0
        for topic in self.topics:
            try:
                committed, begin, _ = partition_offsets(self.cfg.kafka, topic, self.cfg.kafka.consumer_group)
            except Exception as e:  # noqa: BLE001 - the report still comes out, with the reason
                self.errors.append(f"reading committed offsets: {e!r}")
                return None
            total += sum((committed[p] or begin[p]) - begin[p] for p in committed)
        return total

    def _interrupt(self, signum, frame) -> None:
        if not self.interrupted:
            self.interrupted = True
            self.errors.append(
                f"interrupted ({signal.Signals(signum).name}): stopped cleanly; "
                f"`reloop run --resume --run-id {self.run_id}` continues"
            )
        self.stop.set()

    def _on_request(self, live):
        def on_request(req) -> None:
            self.c.alerts += 1
            self.alerts.append(
                {
                    "ts": live.last_ts,
                    "wall_s": round(time.time() - self.t0, 2),
                    "at_event": live.scored,
                    "action": req.action,
                    "level": req.level,
                    "summary": req.reason,
                    "detectors": [d.detector for d in req.detections],
                }
            )

        return on_request

    # -- resume support -----------------------------------------------------------------------------
    def _save_live(self, live, monitor) -> None:

        d = self.state / "live"
        d.mkdir(exist_ok=True)
        a = live.trace.arrays()

        pq.write_table(
            pa.table({k: pa.array(v.tolist() if v.dtype == object else v) for k, v in a.items()}), d / "trace.parquet"
        )
        (d / "state.json").write_text(
            json.dumps(
                {
                    "position": live.position.to_dict(),
                    "unscored": live.unscored,
                    "versions": live.versions,
                    "alerts": self.alerts,
                    "counters": self.c.__dict__,
                },
                default=str,
            )
        )
        save_state(monitor, d / "monitor.json")
        if self.delayed:
            live.save(d)

    def _load_live(self, live, monitor) -> None:

        d = self.state / "live"
        if not (d / "state.json").exists():
            return
        s = json.loads((d / "state.json").read_text())
        live.position = Position.from_dict(s["position"])
        live.unscored, live.versions, self.alerts = s["unscored"], s["versions"], s["alerts"]
        t = pq.read_table(d / "trace.parquet").to_pydict()
        if t["ts"]:
            live.trace.ts, live.trace.y = [np.array(t["ts"])], [np.array(t["y"], float)]
            live.trace.p_base, live.trace.p_mem = [np.array(t["p_base"])], [np.array(t["p_mem"])]
            live.trace.p_prev = [np.array(t["p_prev"], float)]
            live.trace.user = [np.array(t["user"], object)]
            live.trace.event_id = [np.array(t["event_id"], object)]
            live.trace.version = [np.array(t.get("version", [""] * len(t["ts"])), object)]
            live.trace.horizon = [np.array(t.get("horizon", [-1] * len(t["ts"])), np.int64)]
            live.trace.label_ts = [np.array(t.get("label_ts", t["ts"]), np.int64)]
            live.trace.reindex()
            live.scored = len(t["ts"])
        for k in (
            "records_read",
            "events_parsed",
            "dead_lettered",
            "accepted",
            "late",
            "duplicates",
            "examples_written",
            "feature_runs",
            "feature_seconds",
            "alerts",
        ):
            setattr(self.c, k, s["counters"].get(k, 0))
        load_state(monitor, d / "monitor.json")
        if self.delayed:
            live.load(d)
        live.maybe_swap()  # serve the current version again, memory rebuilt from nothing yet

    # -- the report ---------------------------------------------------------------------------------
    def _time_budget(self, wall: float) -> dict[str, dict[str, float]]:
        """Where each stage's wall time went, waits included: the loop is as fast as its slowest chain of waits."""
        c = self.c
        r = lambda x: round(max(0.0, x), 3)  # noqa: E731
        live = self.live_times.as_dict()
        return {
            "replay": {"send to Kafka": r(c.replay_seconds), "wait, or done": r(wall - c.replay_seconds)},
            "feature job": {"micro-batches": r(c.feature_seconds), "wait for events": r(wall - c.feature_seconds)},
            "trainer actor": self.trainer_times,
            "serving": {**live, "start-up, report, other": r(wall - sum(live.values()))},
        }

    def _report(self, live, deployer) -> dict[str, Any]:

        a = live.trace.arrays()
        if self.delayed:  # the trace is in label-arrival order: the report reads it in impression-time order
            order = np.argsort(a["ts"], kind="stable")
            a = {k: v[order] for k, v in a.items()}
        tp = _trainer_predictions(self.cfg.storage.trainer_uri)
        series = {
            "served": Series(a["ts"], a["y"], a["p_base"], a["user"]),
            "served+memory": Series(a["ts"], a["y"], a["p_mem"], a["user"]),
        }
        if len(tp["ts"]):
            # on the same events as the served variants: the trainer's warm-up, which serving never scores,
            # is left out of its figure too
            users = dict(zip(a["event_id"].tolist(), a["user"].tolist()))
            same = np.array([e in users for e in tp["event_id"]], bool)
            series["incremental"] = Series(
                tp["ts"][same],
                tp["label"][same],
                tp["pred"][same],
                np.array([users[e] for e in tp["event_id"][same]], object),
            )

        incidents = group_incidents(self.alerts, deployer.events, end_event=live.scored)
        c = self.c
        wall = time.time() - self.t0
        throughput = {
            "replay": c.replayed / c.replay_seconds if c.replay_seconds else 0.0,
            "feature job": c.records_read / c.feature_seconds if c.feature_seconds else 0.0,
            "trainer (wall)": c.learned / wall if wall else 0.0,
            "scoring + memory": c.scored / live.score_seconds if live.score_seconds else 0.0,
        }
        counts = {
            "events in dataset": self.dataset_rows,
            "replayed": c.replayed,
            "consumed": c.records_read,
            "committed offsets": self.committed,
            "parsed": c.events_parsed,
            "dead-lettered": c.dead_lettered,
            "featurised (accepted)": c.accepted,
            "late": c.late,
            "duplicates": c.duplicates,
            "examples written": c.examples_written,
            "examples learned": c.learned,
            "scored": live.scored,
            "arrived before the first model": live.unscored,
            "alerts": c.alerts,
            "incidents": len(incidents),
            "retrains": deployer.retrains,
            "rollbacks": deployer.rollbacks,
            "gate decisions": len(deployer.decisions),
            "model versions served": len(live.versions),
            "predictions published": self.predictions.sent if self.predictions is not None else 0,
        }
        extra: dict[str, Any] = {}
        if self.side_uri is not None:
            extra["side_features"] = {
                "batch_sources": self.side_uri,
                "rows": self.side_rows,
                "fields": list(SIDE_CATEGORICAL + SIDE_BAGS),
                "feature_service": feature_service_name(self.opts.model, side=True),
            }
        if self.delayed:
            counts.update({f"join: {k.replace('_', ' ')}": v for k, v in sorted(self.join_counts.items())})
            extra["label_delay"] = {
                "delay": self.opts.label_delay,
                "attribution_window_s": self.window_ms / 1000,
                "label_free": _label_free(a),
            }
        violations = [
            v["version"]
            for v in live.versions
            if v.get("first_served_ts") is not None
            and (v.get("trained_until_ts") is None or v["trained_until_ts"] >= v["first_served_ts"])
        ]
        rec = RunRecord(
            self.run_id,
            self.opts.dataset,
            self.opts.model,
            series,
            alerts=self.alerts,
            versions=live.versions,
            shift=self.shift,
            throughput=throughput,
            counts=counts,
            seconds=wall,
            extra={
                "errors": self.errors,
                "deployer": deployer.events,
                "incidents": incidents,
                "gate": deployer.decisions,
                "retrain_comparisons": deployer.retrain_comparisons,
                "freshness": freshness(a["ts"], a["horizon"]),
                "causal_violations": violations,
                "time_budget_s": self._time_budget(wall),
                "promotions": live.trace.promotions(live.versions),
                "shift_first_served_wall_s": live.mark_wall_s,
                "shift_first_served_at_event": live.mark_event,
                "topic": ", ".join(self.topics),
                "state_dir": str(self.state),
                "report_dir": str(self.report_dir),
                **extra,
            },
        )
        if violations:
            self.errors.append(
                f"causal clock violated by {', '.join(violations)}: served events at or before their trained_until_ts"
            )
        write_report(rec, self.report_dir)
        summary = json.loads((self.report_dir / "summary.json").read_text())
        summary.pop("over_time", None)
        return summary


def _label_free(a: dict[str, np.ndarray]) -> dict[str, Any]:
    """The label-free estimate (CBPE) of the served model + memory against the realised metric, chunk by
    chunk of impressions in event time: what a dashboard shows while the chunk's labels are pending."""

    n = len(a["ts"])
    if n < 4000:
        return {"chunks": [], "note": f"{n} served impressions: too few for chunks of 2,000"}
    chunk = 2000 if n >= 20_000 else max(500, n // 10)
    out = estimate_over_time(
        a["p_mem"], a["ts"], a["y"], a["label_ts"], start=chunk, chunk=chunk, calibration_window=5000
    )
    return {**out, "chunk": chunk}


class _Progress:
    """Live terminal view of every stage (rich); one refresh per call."""

    def __init__(self, run: LoopRun) -> None:

        self.run = run
        self.console = Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=2, transient=False)
        self.live.start()

    def update(self, total: int) -> None:

        c, r = self.run.c, self.run
        t = Table(title=f"reloop run {r.run_id}  ({time.time() - r.t0:.0f}s)", show_header=True)
        for col in ("stage", "progress", "detail"):
            t.add_column(col)
        t.add_row("replay", f"{c.replayed:,} / {total:,}", r.topic)
        t.add_row(
            "features",
            f"{c.records_read:,} read",
            f"{c.accepted:,} featurised, {c.dead_lettered:,} dead-lettered, {c.feature_runs} micro-batches",
        )
        t.add_row("trainer", f"{c.learned:,} learned", f"of {c.examples_written:,} examples written")
        detail = f"version {c.version or '-'}"
        if r.live is not None and r.live.scored >= 500:
            last = r.live.trace.last(5000)
            if 0 < last["y"].sum() < len(last["y"]):
                detail += (
                    f", AUC last {len(last['y']):,}: {auc(last['y'], last['p_base']):.4f} base, "
                    f"{auc(last['y'], last['p_mem']):.4f} with memory"
                )
        if r.live is not None and r.live.scored:
            a = r.live.trace.arrays()
            f = freshness(a["ts"], a["horizon"])
            if "events" in f:
                detail += (
                    f"; freshness p50/p99 {f['events']['p50']:,.0f}/{f['events']['p99']:,.0f} events, "
                    f"{f['seconds']['p50'] / 3600:,.1f}/{f['seconds']['p99'] / 3600:,.1f} h behind"
                )
        t.add_row("serving", f"{c.scored:,} scored", detail)

        t.add_row(
            "drift",
            f"{c.alerts} alerts, {len(group_incidents(r.alerts))} incidents",
            "; ".join(f"{a['action']}: {a['summary'][:40]}" for a in r.alerts[-2:]),
        )
        if r.errors:
            t.add_row("errors", str(len(r.errors)), r.errors[-1][:80])
        self.live.update(t)

    def close(self) -> None:
        self.live.stop()
