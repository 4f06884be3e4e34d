"""The feature job: Kafka offsets -> parse / dead-letter -> windowed aggregates -> Feast + training examples.

One run is a micro-batch over the new offsets of every partition::

    python -m pipelines.feature_job --once                      # FnApiRunner, embedded profile
    python -m pipelines.feature_job --every 30 --config prod.yaml
    python -m pipelines.feature_job --once --runner=FlinkRunner --flink_master=host:8081 ...

Every flag the job does not know is a Beam ``PipelineOptions`` flag and passes
through unchanged (default ``--runner=FnApiRunner``, which never tries to
download Prism).

Exactly-once, step by step (see :mod:`pipelines.checkpoint`):

1. plan: committed offsets of the consumer group -> log end (or the pending plan
   of an interrupted run, which is then redone exactly), saved before running;
2. the Beam pipeline reads the ranges, parses, dead-letters, aggregates from the
   state saved for the committed offsets, and writes every sink idempotently
   (files named by the run id, online writes are upserts) plus the new state
   keyed by the stop offsets;
3. only when the pipeline finished successfully are the offsets committed.

A SIGKILL anywhere before step 3 leaves the group at the old offsets; the next
run redoes the same plan from the same state and overwrites the same outputs.
``RELOOP_FAULT=before_commit`` kills the process with SIGKILL right between
the sinks and the commit, ``RELOOP_FAULT=mid_sinks`` after the first
training-example file of the run (used by the crash tests).

Allowed lateness: an event older than (newest accepted event time -
``feature_job.allowed_lateness_s``) is dead-lettered with reason ``late`` and
counted (``late``); a duplicate ``event_id`` within the state's horizon is
dead-lettered with reason ``duplicate`` (the first copy in the log wins); an
event more than ``feature_job.max_ahead_s`` ahead of its partition's recent
event times is dead-lettered with reason ``ahead``, so it cannot drag the
watermark (see :func:`pipelines.aggregates.screen_ahead`). A record the parser
cannot handle is quarantined to the DLQ, so no record fails a run (which would
redo the same saved plan forever).


The aggregates follow the config's lateness:

>>> from pipelines.config import FeatureJobConfig
>>> cfg = PipelineConfig(feature_job=FeatureJobConfig(allowed_lateness_s=60))
>>> aggregate_config(cfg).allowed_lateness_ms
60000
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from features.windows import parse_duration_ms
from online_models.errors import ReloopError
from pipelines import consumer_group
from pipelines.aggregates import AggregateConfig
from pipelines.checkpoint import PartitionRange, Plan, StateStore
from pipelines.config import PipelineConfig, load_pipeline_config
from pipelines.feast_io import apply_repo, open_store
from pipelines.join import FEEDBACK_PARTITION_BASE, JoinConfig
from pipelines.kafka_io import ensure_topics

# Beam, and the modules built on it (transforms, join_transforms, kafka_source), are imported inside the
# functions that build and run a job, on purpose: ``reloop features`` and ``python -m pipelines.feature_job``
# check their flags and config first, and importing Beam takes ~1 s and logs a GCS warning on stderr, before
# a config error that must be the one line there (tests/test_cli_errors.py).

log = logging.getLogger(__name__)

COUNTERS = (
    "records_read",
    "events_parsed",
    "rejected",
    "dead_lettered",
    "accepted",
    "late",
    "duplicates",
    "deferred",
    "examples_written",
    "feature_rows_written",
)


class FeatureJobError(ReloopError, RuntimeError):
    """The job cannot run: unreachable broker, missing state for the committed offsets, failed pipeline."""


@dataclass
class JobStats:
    """What one run did; ``start``/``stop`` are the offsets per partition, ``run_id`` names its outputs."""

    run_id: str = ""
    topic: str = ""
    start: dict[int, int] = field(default_factory=dict)
    stop: dict[int, int] = field(default_factory=dict)
    records_read: int = 0
    events_parsed: int = 0
    dead_lettered: int = 0
    rejected: int = 0
    accepted: int = 0
    late: int = 0
    duplicates: int = 0
    deferred: int = 0
    examples_written: int = 0
    feature_rows_written: int = 0
    dlq_reasons: dict[str, int] = field(default_factory=dict)
    #: contract v2 only: the join's counters (positives, negatives, orphan_feedback, late_feedback, ...)
    join: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    committed: bool = False

    @property
    def events_per_s(self) -> float:
        return self.records_read / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate_config(cfg: PipelineConfig):
    return AggregateConfig(
        allowed_lateness_ms=int(cfg.feature_job.allowed_lateness_s * 1000),
        max_ahead_ms=int(cfg.feature_job.max_ahead_s * 1000),
    )


def pipeline_options(pipeline_args: list[str] | None):
    """Beam options from the pass-through flags; the local FnApiRunner unless ``--runner`` says otherwise."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    opts = PipelineOptions(pipeline_args or [])
    if opts.view_as(StandardOptions).runner is None:
        opts.view_as(StandardOptions).runner = "FnApiRunner"
    return opts


def build(p, cfg: PipelineConfig, plan, *, repo_path: str | None = None) -> None:
    """Attach the job's transforms for one planned micro-batch to pipeline ``p``."""
    import apache_beam as beam

    from pipelines.kafka_source import ReadKafkaRanges
    from pipelines.transforms import ComputeFeatures, ParseRecords, WriteDeadLetters, WriteExamples, WriteFeatures

    fj = cfg.feature_job
    raw = (
        p
        | "PlanRanges" >> beam.Create(plan.ranges())
        | "ReadKafka" >> ReadKafkaRanges(cfg.kafka, fj.read_batch_size, fj.split_size)
    )
    parsed = raw | "Parse" >> ParseRecords(plan.planned_at_ms)
    out = parsed.events | "Features" >> ComputeFeatures(fj.state_uri, plan, aggregate_config(cfg), cfg.kafka)
    _ = parsed.dlq | "DeadLetter" >> WriteDeadLetters(cfg.kafka, plan.topic, cfg.kafka.dlq_topic, out.stops)
    _ = out.examples | "TrainingExamples" >> WriteExamples(cfg.storage.examples_uri, plan.run_id)
    _ = out.snapshots | "Feast" >> WriteFeatures(cfg.feast, repo_path, plan.run_id)


def _ensure_feast(cfg: PipelineConfig, repo_path: str | None) -> None:
    store = open_store(cfg.feast, repo_path)
    if not store.list_feature_views():
        log.info("feast: applying the feature repo %s", store.repo_path)
        apply_repo(cfg.feast, repo_path)


def _counters(result) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace("feature_job"))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


@contextmanager
def _reaching_kafka(cfg: PipelineConfig) -> Iterator[None]:
    """Turn a broker error while planning into the job's own error, with the hint to start Kafka."""
    try:
        yield
    except KafkaError as e:
        raise FeatureJobError(
            f"cannot reach Kafka at {cfg.kafka.bootstrap_servers}: {e} (is it up? `reloop up kafka`)"
        ) from e


def _run_planned(
    cfg: PipelineConfig,
    store,
    plan,
    stats: JobStats,
    *,
    job: str,
    unit: str,
    saved_state,
    attach: Callable[[object], None],
    commit: Callable[[object], None],
    pipeline_args: list[str] | None,
    repo_path: str | None,
    ensure_feast: bool,
) -> dict[str, int] | None:
    """The exactly-once steps both contracts share, for one planned micro-batch: check the saved state,
    save the plan as pending, run the Beam pipeline ``attach(p)`` builds, then (only when it is DONE and
    left its result) ``commit(completed_plan)`` the offsets and drop the pending plan and the old states.

    ``job`` names the job in the log and errors (``"feature"``, ``"join"``), ``unit`` what a plan counts
    (``"events"``, ``"records"``), ``saved_state(key)`` loads the state a run starts from. Fills ``stats``
    with the shared counters and returns the Beam counters, or None when the plan is empty.
    """
    import apache_beam as beam

    if plan.events == 0:
        return None
    if plan.committed and saved_state(plan.start_key) is None:
        raise FeatureJobError(
            f"no {job} state under {cfg.feature_job.state_uri} for the committed offsets {plan.committed} of "
            f"group {cfg.kafka.consumer_group}; the state was moved or wiped. `reloop features --reset` "
            f"recomputes from the start."
        )
    if ensure_feast:
        _ensure_feast(cfg, repo_path)
    store.save_pending(plan)
    log.info("%s job %s: %d %s %s -> %s", job, plan.run_id, plan.events, unit, plan.start, plan.stop)

    p = beam.Pipeline(options=pipeline_options(pipeline_args))
    attach(p)
    result = p.run()
    state = result.wait_until_finish()
    if str(state) not in ("DONE", "PipelineState.DONE"):
        raise FeatureJobError(f"{job} pipeline ended in state {state}; offsets not committed")
    counts = _counters(result)

    if os.environ.get("RELOOP_FAULT") == "before_commit":  # crash-test hook: sinks written, offsets not
        os.kill(os.getpid(), signal.SIGKILL)
    done = store.load_result(plan.run_id)
    if done is None:
        raise FeatureJobError(f"run {plan.run_id} finished without a result under {store.uri}; not committed")
    completed = plan.with_stops(done)
    commit(completed)
    store.clear_pending()
    store.prune_states(keep={completed.stop_key})
    stats.stop = completed.stop

    for name in COUNTERS:
        setattr(stats, name, counts.get(name, 0))
    stats.dlq_reasons = {k[4:]: v for k, v in counts.items() if k.startswith("dlq_")}
    stats.committed = True
    return counts


def run_once(
    cfg: PipelineConfig,
    *,
    pipeline_args: list[str] | None = None,
    repo_path: str | None = None,
    topic: str | None = None,
    ensure_feast: bool = True,
) -> JobStats:
    """Plan, run and commit one micro-batch; returns what it did (zero counts when there was nothing new)."""
    t0 = time.perf_counter()
    topic = topic or cfg.kafka.events_topic
    group = cfg.kafka.consumer_group
    store = StateStore(cfg.feature_job.state_uri)
    with _reaching_kafka(cfg):
        ensure_topics(cfg.kafka, [topic, cfg.kafka.dlq_topic])
        plan = consumer_group.plan_run(cfg.kafka, topic, group, store, cfg.feature_job.max_events_per_run)
    stats = JobStats(run_id=plan.run_id, topic=topic, start=plan.start, stop=plan.stop)
    _run_planned(
        cfg,
        store,
        plan,
        stats,
        job="feature",
        unit="events",
        saved_state=store.load_state,
        attach=lambda p: build(p, cfg, plan, repo_path=repo_path),
        commit=lambda completed: consumer_group.commit(cfg.kafka, completed, group),
        pipeline_args=pipeline_args,
        repo_path=repo_path,
        ensure_feast=ensure_feast,
    )
    stats.seconds = time.perf_counter() - t0
    return stats


# ---------------------------------------------------------------------------------------------------------
# contract v2: impressions + feedback, joined in an attribution window (see pipelines.join)


def join_config(cfg: PipelineConfig):
    fj = cfg.feature_job
    return JoinConfig(
        window_ms=int(fj.attribution_window_s * 1000),
        closed_retention_ms=int(fj.closed_retention_s * 1000),
        idle_timeout_ms=int(fj.idle_timeout_s * 1000),
        features=aggregate_config(cfg),
    )


def joint_plan(plan_i, plan_f):
    """One plan over both topics: feedback partitions numbered from ``FEEDBACK_PARTITION_BASE``, so one
    pending file, one run id, one cut and one state key cover the two topics."""
    shift = lambda m: {FEEDBACK_PARTITION_BASE + p: o for p, o in m.items()}  # noqa: E731
    return Plan(
        f"{plan_i.topic}+{plan_f.topic}",
        {**plan_i.start, **shift(plan_f.start)},
        {**plan_i.stop, **shift(plan_f.stop)},
        plan_i.planned_at_ms,
        {**plan_i.committed, **shift(plan_f.committed)},
    )


def split_ranges(plan, topics: tuple[str, str]):
    """The joint plan's ranges as real ``(impression ranges, feedback ranges)`` of the two topics."""
    B = FEEDBACK_PARTITION_BASE
    imp = [PartitionRange(topics[0], r.partition, r.start, r.stop) for r in plan.ranges() if r.partition < B]
    fb = [PartitionRange(topics[1], r.partition - B, r.start, r.stop) for r in plan.ranges() if r.partition >= B]
    return imp, fb


def build_join(p, cfg: PipelineConfig, plan, topics: tuple[str, str], *, repo_path: str | None = None) -> None:
    """Attach the v2 job (two topics -> parse -> join -> sinks) for one joint micro-batch to ``p``."""
    import apache_beam as beam

    from pipelines.join_transforms import JoinFn, JointDeadLetterFn, ParseFeedbackFn, ParseImpressionsFn
    from pipelines.kafka_source import ReadKafkaRanges
    from pipelines.transforms import WriteExamples, WriteFeatures

    fj = cfg.feature_job
    imp_ranges, fb_ranges = split_ranges(plan, topics)
    raw_i = (
        p
        | "PlanImpressions" >> beam.Create(imp_ranges)
        | "ReadImpressions" >> ReadKafkaRanges(cfg.kafka, fj.read_batch_size, fj.split_size)
    )
    raw_f = (
        p
        | "PlanFeedback" >> beam.Create(fb_ranges)
        | "ReadFeedback" >> ReadKafkaRanges(cfg.kafka, fj.read_batch_size, fj.split_size)
    )
    imps = raw_i | "ParseImpressions" >> beam.ParDo(ParseImpressionsFn(plan.planned_at_ms)).with_outputs(
        "feedback", "dlq", main="impressions"
    )
    fbs = raw_f | "ParseFeedback" >> beam.ParDo(ParseFeedbackFn(plan.planned_at_ms)).with_outputs(
        "dlq", main="feedback"
    )
    tagged = (
        (imps.impressions | "TagI" >> beam.Map(lambda t: (0, ("i", t))).with_output_types(tuple[int, tuple])),
        (imps.feedback | "TagV1" >> beam.Map(lambda t: (0, ("f", t))).with_output_types(tuple[int, tuple])),
        (fbs.feedback | "TagF" >> beam.Map(lambda t: (0, ("f", t))).with_output_types(tuple[int, tuple])),
    )
    out = (
        tagged
        | "Both" >> beam.Flatten()
        | "GatherMicroBatch" >> beam.GroupByKey()
        | "Join"
        >> beam.ParDo(JoinFn(fj.state_uri, plan, join_config(cfg), cfg.kafka, topics)).with_outputs(
            "examples", "snapshots", "dlq", "stops"
        )
    )
    stops = beam.pvalue.AsSingleton(out.stops)
    dlq = cfg.kafka.dlq_topic
    _ = imps.dlq | "DeadLetterImpressions" >> beam.ParDo(JointDeadLetterFn(cfg.kafka, topics[0], dlq, 0), stops=stops)
    _ = fbs.dlq | "DeadLetterFeedback" >> beam.ParDo(
        JointDeadLetterFn(cfg.kafka, topics[1], dlq, FEEDBACK_PARTITION_BASE), stops=stops
    )
    _ = out.dlq | "DeadLetterOrphans" >> beam.ParDo(
        JointDeadLetterFn(cfg.kafka, topics[1], dlq, FEEDBACK_PARTITION_BASE)
    )
    _ = out.examples | "TrainingExamples" >> WriteExamples(cfg.storage.examples_uri, plan.run_id)
    _ = out.snapshots | "Feast" >> WriteFeatures(cfg.feast, repo_path, plan.run_id)


def commit_joint(cfg: PipelineConfig, plan, topics: tuple[str, str], group: str) -> None:
    """Commit both topics' offsets in one OffsetCommit request (one group: the coordinator appends them
    to the group's ``__consumer_offsets`` partition together, so a crash never commits one topic only)."""
    B = FEEDBACK_PARTITION_BASE
    offsets = {
        TopicPartition(topics[1] if p >= B else topics[0], p - B if p >= B else p): OffsetAndMetadata(
            o, plan.run_id, -1
        )
        for p, o in plan.committed_after.items()
        if o != plan.committed.get(p)
    }
    if not offsets:
        return
    consumer = KafkaConsumer(
        **cfg.kafka.client_options(),
        group_id=group,
        enable_auto_commit=False,
        request_timeout_ms=30_000,
        allow_auto_create_topics=False,
    )
    try:
        consumer.commit(offsets)
    finally:
        consumer.close()


def run_join_once(
    cfg: PipelineConfig,
    *,
    pipeline_args: list[str] | None = None,
    repo_path: str | None = None,
    ensure_feast: bool = True,
) -> JobStats:
    """Plan, run and commit one joint micro-batch of ``kafka.impressions_topic`` + ``kafka.feedback_topic``.

    Exactly-once as :func:`run_once`: the joint plan is saved before running, the join state is saved under
    the key of the completed offsets, and both topics' offsets are committed together only after the sinks.
    """
    t0 = time.perf_counter()
    topics = (cfg.kafka.impressions_topic, cfg.kafka.feedback_topic)
    group = cfg.kafka.consumer_group
    store = StateStore(cfg.feature_job.state_uri)
    with _reaching_kafka(cfg):
        ensure_topics(cfg.kafka, [*topics, cfg.kafka.dlq_topic])
        # feedback first: a click is produced after its impression, so every click this plan reads has its
        # impression in the impressions' plan read a moment later (the other order would make a click sent
        # between the two reads an orphan, dead-lettered)
        plan_f = consumer_group.plan_run(cfg.kafka, topics[1], group, store, cfg.feature_job.max_events_per_run)
        plan_i = consumer_group.plan_run(cfg.kafka, topics[0], group, store, cfg.feature_job.max_events_per_run)
        _, _, end_i = consumer_group.partition_offsets(cfg.kafka, topics[0], group)
        _, _, end_f = consumer_group.partition_offsets(cfg.kafka, topics[1], group)
    plan = joint_plan(plan_i, plan_f)
    pending = store.load_pending(plan.start_key)
    if pending is not None and pending.start == plan.start:  # an interrupted run: redo exactly that one
        end = {**end_i, **{FEEDBACK_PARTITION_BASE + p: o for p, o in end_f.items()}}
        if any(pending.stop[p] > end.get(p, pending.stop[p]) for p in pending.stop):
            raise FeatureJobError(
                f"the interrupted run planned offsets beyond the log end of {topics}; "
                f"were the topics recreated? `reloop features --reset`"
            )
        plan = pending
    stats = JobStats(run_id=plan.run_id, topic=plan.topic, start=plan.start, stop=plan.stop)
    counts = _run_planned(
        cfg,
        store,
        plan,
        stats,
        job="join",
        unit="records",
        saved_state=store.load_join_state,
        attach=lambda p: build_join(p, cfg, plan, topics, repo_path=repo_path),
        commit=lambda completed: commit_joint(cfg, completed, topics, group),
        pipeline_args=pipeline_args,
        repo_path=repo_path,
        ensure_feast=ensure_feast,
    )
    if counts is not None:  # the join names its impression counters after the join
        stats.accepted = counts.get("join_impressions_accepted", 0)
        stats.late = counts.get("join_impressions_late", 0)
        stats.duplicates = counts.get("join_impressions_duplicate", 0)
        stats.events_parsed = counts.get("impressions_parsed", 0) + counts.get("feedback_parsed", 0)
        stats.join = {k[5:]: v for k, v in counts.items() if k.startswith("join_")}
    stats.seconds = time.perf_counter() - t0
    return stats


def run_feature_job(
    cfg: PipelineConfig,
    once: bool = True,
    every: float | None = None,
    *,
    pipeline_args: list[str] | None = None,
    repo_path: str | None = None,
    topic: str | None = None,
    max_runs: int | None = None,
    on_run=None,
    max_failures: int = 5,
    join: bool = False,
) -> JobStats:
    """Run one micro-batch (``once``) or one every ``every`` seconds until interrupted (or ``max_runs``).

    Returns the stats of the last run; ``on_run(stats)`` is called after each run. In the loop a failed
    run (broker down, a sink failing) is logged and retried at the next tick: nothing was committed, so
    the retry redoes the same plan. ``max_failures`` failures in a row end the loop with the error.
    ``join``: contract v2 (impressions + feedback topics, :func:`run_join_once`).
    """

    def step(cfg, *, pipeline_args=None, repo_path=None, topic=None, ensure_feast=True) -> JobStats:
        if join:
            return run_join_once(cfg, pipeline_args=pipeline_args, repo_path=repo_path, ensure_feast=ensure_feast)
        return run_once(cfg, pipeline_args=pipeline_args, repo_path=repo_path, topic=topic, ensure_feast=ensure_feast)

    if once or not every:
        stats = step(cfg, pipeline_args=pipeline_args, repo_path=repo_path, topic=topic)
        if on_run:
            on_run(stats)
        return stats
    runs, failures, stats = 0, 0, JobStats()
    while max_runs is None or runs < max_runs:
        started = time.monotonic()
        try:
            stats = step(cfg, pipeline_args=pipeline_args, repo_path=repo_path, topic=topic, ensure_feast=runs == 0)
            failures = 0
            if on_run:
                on_run(stats)
        except Exception as e:  # noqa: BLE001  (a long-running job retries; the error is logged, then re-raised)
            failures += 1
            log.error("feature job run failed (%d in a row): %s", failures, e)
            if failures >= max_failures:
                raise
        runs += 1
        if max_runs is not None and runs >= max_runs:
            break
        time.sleep(max(0.0, every - (time.monotonic() - started)))
    return stats


def reset_feature_job(cfg: PipelineConfig, topic: str | None = None) -> None:
    """Forget the group's offsets and the saved state: the next run recomputes from the earliest offsets."""
    consumer_group.reset(cfg.kafka, cfg.kafka.consumer_group)
    store = StateStore(cfg.feature_job.state_uri)
    store.clear_pending()
    store.prune_states(keep=set())


def format_stats(s: JobStats) -> str:
    if not s.committed:
        return f"feature job: nothing new on {s.topic} (offsets {s.start})"
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(s.dlq_reasons.items()))
    if s.join:
        j = s.join
        return (
            f"join job {s.run_id}: read {s.records_read:,}, dead-lettered {s.dead_lettered:,}"
            f"{f' ({reasons})' if reasons else ''}, impressions {j.get('impressions_accepted', 0):,}, "
            f"clicks {j.get('feedback_accepted', 0):,}, examples {s.examples_written:,} "
            f"(+{j.get('positives', 0):,} / -{j.get('negatives', 0):,}), late clicks "
            f"{j.get('late_feedback', 0):,}, duplicate clicks {j.get('duplicate_feedback', 0):,}, orphans "
            f"{j.get('orphan_feedback', 0):,}, deferred {s.deferred:,} in {s.seconds:.2f}s"
        )
    return (
        f"feature job {s.run_id}: read {s.records_read:,}, parsed {s.events_parsed:,}, "
        f"dead-lettered {s.dead_lettered:,}{f' ({reasons})' if reasons else ''}, accepted {s.accepted:,}, "
        f"late {s.late:,}, duplicates {s.duplicates:,}, deferred {s.deferred:,}, examples {s.examples_written:,}, "
        f"feature rows {s.feature_rows_written:,} in {s.seconds:.2f}s ({s.events_per_s:,.0f} events/s)"
    )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.feature_job",
        description=__doc__.split("\n")[0],
        epilog="Other flags are Beam PipelineOptions (e.g. --runner=FlinkRunner).",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one micro-batch, then exit (default)")
    mode.add_argument("--every", type=float, metavar="SECONDS", help="one micro-batch every SECONDS")
    ap.add_argument("--config", help="reloop YAML config (default: embedded profile)")
    ap.add_argument("--topic", help="events topic (default: kafka.events_topic)")
    ap.add_argument("--feature_repo", help="Feast repo directory (default: feast.repo_path)")
    ap.add_argument("--examples_uri", help="training-example root, local path or pyarrow.fs URI")
    ap.add_argument("--state_uri", help="feature-state root, local path or pyarrow.fs URI")
    ap.add_argument("--max_events", type=int, help="cap on the events of one micro-batch")
    ap.add_argument("--reset", action="store_true", help="forget offsets and state, then exit")
    ap.add_argument(
        "--join",
        action="store_true",
        help="contract v2: join kafka.impressions_topic and "
        "kafka.feedback_topic in the attribution window (implied by --attribution-window)",
    )
    ap.add_argument(
        "--attribution-window",
        "--attribution_window",
        dest="attribution_window",
        help="contract v2: how long after an impression a click counts, e.g. 30m, 1h (event time)",
    )
    return ap.parse_known_args(argv)


def config_with_overrides(args: argparse.Namespace) -> PipelineConfig:
    cfg = load_pipeline_config(args.config)
    window = None
    if getattr(args, "attribution_window", None):
        try:
            window = parse_duration_ms(args.attribution_window) / 1000.0
        except ValueError as e:
            raise SystemExit(f"error: --attribution-window: {e}") from None
        if window <= 0:
            raise SystemExit("error: --attribution-window must be positive")
    fj = cfg.feature_job.model_copy(
        update={
            k: v
            for k, v in (
                ("state_uri", args.state_uri),
                ("max_events_per_run", args.max_events),
                ("attribution_window_s", window),
            )
            if v
        }
    )
    storage = cfg.storage.model_copy(update={"examples_uri": args.examples_uri} if args.examples_uri else {})
    return cfg.model_copy(update={"feature_job": fj, "storage": storage})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, beam_args = parse_args(argv)
    cfg = config_with_overrides(args)
    if args.reset:
        reset_feature_job(cfg, args.topic)
        print(
            f"feature job reset: offsets of group {cfg.kafka.consumer_group} and the state under "
            f"{cfg.feature_job.state_uri} forgotten. Outputs are left in place: remove "
            f"{cfg.storage.examples_uri} and the Feast offline files (or point them elsewhere) before "
            f"recomputing, or the examples of the old runs stay next to the new ones."
        )
        return 0
    try:
        run_feature_job(
            cfg,
            once=not args.every,
            every=args.every,
            pipeline_args=beam_args,
            repo_path=args.feature_repo,
            topic=args.topic,
            on_run=lambda s: print(format_stats(s), flush=True),
            join=args.join or bool(args.attribution_window),
        )
    except FeatureJobError as e:
        print(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
