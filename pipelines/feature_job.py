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
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field

from reloop.config import ReloopConfig

log = logging.getLogger(__name__)

COUNTERS = ("records_read", "events_parsed", "rejected", "dead_lettered", "accepted", "late", "duplicates",
            "deferred", "examples_written", "feature_rows_written")


class FeatureJobError(RuntimeError):
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
    seconds: float = 0.0
    committed: bool = False

    @property
    def events_per_s(self) -> float:
        return self.records_read / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate_config(cfg: ReloopConfig):
    from pipelines.aggregates import AggregateConfig

    return AggregateConfig(allowed_lateness_ms=int(cfg.feature_job.allowed_lateness_s * 1000),
                           max_ahead_ms=int(cfg.feature_job.max_ahead_s * 1000))


def pipeline_options(pipeline_args: list[str] | None):
    """Beam options from the pass-through flags; the local FnApiRunner unless ``--runner`` says otherwise."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    opts = PipelineOptions(pipeline_args or [])
    if opts.view_as(StandardOptions).runner is None:
        opts.view_as(StandardOptions).runner = "FnApiRunner"
    return opts


def build(p, cfg: ReloopConfig, plan, *, repo_path: str | None = None) -> None:
    """Attach the job's transforms for one planned micro-batch to pipeline ``p``."""
    import apache_beam as beam

    from pipelines.kafka_source import ReadKafkaRanges
    from pipelines.transforms import ComputeFeatures, ParseRecords, WriteDeadLetters, WriteExamples, WriteFeatures

    fj = cfg.feature_job
    raw = (p | "PlanRanges" >> beam.Create(plan.ranges())
             | "ReadKafka" >> ReadKafkaRanges(cfg.kafka, fj.read_batch_size, fj.split_size))
    parsed = raw | "Parse" >> ParseRecords(plan.planned_at_ms)
    out = parsed.events | "Features" >> ComputeFeatures(fj.state_uri, plan, aggregate_config(cfg), cfg.kafka)
    _ = parsed.dlq | "DeadLetter" >> WriteDeadLetters(cfg.kafka, plan.topic, cfg.kafka.dlq_topic, out.stops)
    _ = out.examples | "TrainingExamples" >> WriteExamples(cfg.storage.examples_uri, plan.run_id)
    _ = out.snapshots | "Feast" >> WriteFeatures(cfg.feast, repo_path, plan.run_id)


def _ensure_feast(cfg: ReloopConfig, repo_path: str | None) -> None:
    from pipelines.feast_io import apply_repo, open_store

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


def run_once(cfg: ReloopConfig, *, pipeline_args: list[str] | None = None, repo_path: str | None = None,
             topic: str | None = None, ensure_feast: bool = True) -> JobStats:
    """Plan, run and commit one micro-batch; returns what it did (zero counts when there was nothing new)."""
    import apache_beam as beam
    from kafka.errors import KafkaError

    from pipelines import consumer_group
    from pipelines.checkpoint import StateStore
    from reloop.kafka_io import ensure_topics

    t0 = time.perf_counter()
    topic = topic or cfg.kafka.events_topic
    group = cfg.kafka.consumer_group
    store = StateStore(cfg.feature_job.state_uri)
    try:
        ensure_topics(cfg.kafka, [topic, cfg.kafka.dlq_topic])
        plan = consumer_group.plan_run(cfg.kafka, topic, group, store, cfg.feature_job.max_events_per_run)
    except KafkaError as e:
        raise FeatureJobError(f"cannot reach Kafka at {cfg.kafka.bootstrap_servers}: {e} "
                              f"(is it up? `reloop up kafka`)") from e
    stats = JobStats(run_id=plan.run_id, topic=topic, start=plan.start, stop=plan.stop)
    if plan.events == 0:
        stats.seconds = time.perf_counter() - t0
        return stats
    if plan.committed and store.load_state(plan.start_key) is None:
        raise FeatureJobError(
            f"no feature state under {cfg.feature_job.state_uri} for the committed offsets {plan.committed} of "
            f"group {group}; the state was moved or wiped. `reloop features --reset` recomputes from the start.")
    if ensure_feast:
        _ensure_feast(cfg, repo_path)
    store.save_pending(plan)
    log.info("feature job %s: %d events %s -> %s", plan.run_id, plan.events, plan.start, plan.stop)

    p = beam.Pipeline(options=pipeline_options(pipeline_args))
    build(p, cfg, plan, repo_path=repo_path)
    result = p.run()
    state = result.wait_until_finish()
    if str(state) not in ("DONE", "PipelineState.DONE"):
        raise FeatureJobError(f"feature pipeline ended in state {state}; offsets not committed")
    counts = _counters(result)

    if os.environ.get("RELOOP_FAULT") == "before_commit":  # crash-test hook: sinks written, offsets not
        os.kill(os.getpid(), signal.SIGKILL)
    done = store.load_result(plan.run_id)
    if done is None:
        raise FeatureJobError(f"run {plan.run_id} finished without a result under {store.uri}; not committed")
    completed = plan.with_stops(done)
    consumer_group.commit(cfg.kafka, completed, group)
    store.clear_pending()
    store.prune_states(keep={completed.stop_key})
    stats.stop = completed.stop

    for name in COUNTERS:
        setattr(stats, name, counts.get(name, 0))
    stats.dlq_reasons = {k[4:]: v for k, v in counts.items() if k.startswith("dlq_")}
    stats.committed = True
    stats.seconds = time.perf_counter() - t0
    return stats


def run_feature_job(cfg: ReloopConfig, once: bool = True, every: float | None = None, *,
                    pipeline_args: list[str] | None = None, repo_path: str | None = None,
                    topic: str | None = None, max_runs: int | None = None, on_run=None,
                    max_failures: int = 5) -> JobStats:
    """Run one micro-batch (``once``) or one every ``every`` seconds until interrupted (or ``max_runs``).

    Returns the stats of the last run; ``on_run(stats)`` is called after each run. In the loop a failed
    run (broker down, a sink failing) is logged and retried at the next tick: nothing was committed, so
    the retry redoes the same plan. ``max_failures`` failures in a row end the loop with the error.
    """
    if once or not every:
        stats = run_once(cfg, pipeline_args=pipeline_args, repo_path=repo_path, topic=topic)
        if on_run:
            on_run(stats)
        return stats
    runs, failures, stats = 0, 0, JobStats()
    while max_runs is None or runs < max_runs:
        started = time.monotonic()
        try:
            stats = run_once(cfg, pipeline_args=pipeline_args, repo_path=repo_path, topic=topic,
                             ensure_feast=runs == 0)
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


def reset_feature_job(cfg: ReloopConfig, topic: str | None = None) -> None:
    """Forget the group's offsets and the saved state: the next run recomputes from the earliest offsets."""
    from pipelines import consumer_group
    from pipelines.checkpoint import StateStore

    consumer_group.reset(cfg.kafka, cfg.kafka.consumer_group)
    store = StateStore(cfg.feature_job.state_uri)
    store.clear_pending()
    store.prune_states(keep=set())


def format_stats(s: JobStats) -> str:
    if not s.committed:
        return f"feature job: nothing new on {s.topic} (offsets {s.start})"
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(s.dlq_reasons.items()))
    return (f"feature job {s.run_id}: read {s.records_read:,}, parsed {s.events_parsed:,}, "
            f"dead-lettered {s.dead_lettered:,}{f' ({reasons})' if reasons else ''}, accepted {s.accepted:,}, "
            f"late {s.late:,}, duplicates {s.duplicates:,}, deferred {s.deferred:,}, examples {s.examples_written:,}, "
            f"feature rows {s.feature_rows_written:,} in {s.seconds:.2f}s ({s.events_per_s:,.0f} events/s)")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m pipelines.feature_job", description=__doc__.split("\n")[0],
                                 epilog="Other flags are Beam PipelineOptions (e.g. --runner=FlinkRunner).")
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
    return ap.parse_known_args(argv)


def config_with_overrides(args: argparse.Namespace) -> ReloopConfig:
    from reloop.config import load_config

    cfg = load_config(args.config)
    fj = cfg.feature_job.model_copy(update={k: v for k, v in (("state_uri", args.state_uri),
                                                              ("max_events_per_run", args.max_events)) if v})
    storage = cfg.storage.model_copy(update={"examples_uri": args.examples_uri} if args.examples_uri else {})
    return cfg.model_copy(update={"feature_job": fj, "storage": storage})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, beam_args = parse_args(argv)
    cfg = config_with_overrides(args)
    if args.reset:
        reset_feature_job(cfg, args.topic)
        print(f"feature job reset: offsets of group {cfg.kafka.consumer_group} and the state under "
              f"{cfg.feature_job.state_uri} forgotten. Outputs are left in place: remove "
              f"{cfg.storage.examples_uri} and the Feast offline files (or point them elsewhere) before "
              f"recomputing, or the examples of the old runs stay next to the new ones.")
        return 0
    try:
        run_feature_job(cfg, once=not args.every, every=args.every, pipeline_args=beam_args,
                        repo_path=args.feature_repo, topic=args.topic, on_run=lambda s: print(format_stats(s),
                                                                                             flush=True))
    except FeatureJobError as e:
        print(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
