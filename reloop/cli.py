"""The ``reloop`` command line.

Each sub-command is a thin shell over a function elsewhere in the code base;
heavy imports (torch, Beam, Ray, Feast) happen inside the command, so
``reloop --help`` stays fast (measured: 0.3 s, against 13 s for importing torch, Ray, Beam and Feast
up front on this 2-core machine). The modules a command calls import at their top.
"""

from __future__ import annotations

import sys

import typer

from online_models.settings import SERVING_MEMORY  # light: no torch

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="reloop: streaming continual learning for CTR models "
    "(Kafka -> Beam -> Feast -> Ray, with a ReLoop2 error-compensation memory).",
)

SERVICE_NAMES = ("kafka", "redis", "ray")


def _fail(msg: str, code: int = 1) -> None:
    typer.secho(msg, fg="red", err=True)
    raise typer.Exit(code)


def _fail_for(e: BaseException) -> None:
    """Exit 2 with one line for a config or input error, else exit 1 with the message."""
    if isinstance(e, _input_errors()):
        _fail(f"error: {' '.join(str(e).split()) or type(e).__name__}", 2)
    _fail(str(e))


def _input_errors() -> tuple[type[BaseException], ...]:
    """What a bad config, flag or input file raises: one clear line and exit code 2, never a traceback."""
    import yaml
    from pydantic import ValidationError

    from online_models.errors import ConfigError

    return (
        ConfigError,
        ValidationError,
        yaml.YAMLError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
        ValueError,
    )


def clean_errors(fn):
    """Decorator of every command: config and input errors become ``error: <one line>`` with exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except _input_errors() as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            _fail(f"error: {msg}", 2)

    return wrapper


def _command(*args, **kwargs):
    """``@app.command`` that also applies :func:`clean_errors`."""

    def register(fn):
        return app.command(*args, **kwargs)(clean_errors(fn))

    return register


@_command()
def up(
    services: list[str] = typer.Argument(None, help="kafka, redis, ray, flink, s3 (default: kafka, redis, ray)"),
    with_: list[str] = typer.Option(None, "--with", help="also start these, e.g. --with flink"),
    workers: int = typer.Option(0, min=0, help="with ray: this many more Ray nodes beside the head"),
) -> None:
    """Start the local services (idempotent): Kafka (KRaft), Redis, a Ray head; optionally a Flink job server,
    s3proxy (s3) and more Ray nodes (--workers)."""
    from reloop import services as svc

    names = [*(services or SERVICE_NAMES), *(with_ or [])]
    if workers and "ray" in names:
        names += [f"ray-worker-{i}" for i in range(1, workers + 1)]
    for name in names:
        try:
            st = svc.get(name).start()
        except svc.ServiceError as e:
            _fail(f"{name}: {e}")
        typer.echo(f"{name:6s} up    {st.address:24s} pid {st.pid}  {st.version}")


@_command()
def down(
    services: list[str] = typer.Argument(
        None, help="kafka, redis, ray (and its worker nodes), flink, s3 (default: kafka, redis, ray)"
    ),
    with_: list[str] = typer.Option(None, "--with", help="also stop these, e.g. --with flink"),
) -> None:
    """Stop the local services that reloop started (by pid; nothing else is touched)."""
    from reloop import services as svc

    for name in [*(services or SERVICE_NAMES), *(with_ or [])]:
        svc.get(name).stop()
        typer.echo(f"{name:6s} stopped")


@_command()
def status() -> None:
    """Which local services are up, their addresses and versions."""
    from reloop import services as svc

    down_count = 0
    for name in SERVICE_NAMES:
        st = svc.get(name).status()
        down_count += not st.running
        state = typer.style("up  ", fg="green") if st.running else typer.style("down", fg="yellow")
        typer.echo(f"{name:6s} {state}  {st.address:24s} pid {st.pid or '-':>7}  {st.version}")
    raise typer.Exit(0 if down_count == 0 else 3)


@_command()
def replay(
    dataset: str = typer.Option("movielens-100k", help="movielens-100k, or a CSV/Parquet path"),
    limit: int | None = typer.Option(None, min=1, help="only the first N events in time order"),
    speed: str = typer.Option("max", help="'max', or 'Nx' for N times real time (e.g. 3600x)"),
    topic: str | None = typer.Option(None, help="Kafka topic (default: kafka.events_topic of the config)"),
    config: str | None = typer.Option(None, help="YAML config file"),
    label_delay: str | None = typer.Option(
        None,
        "--label-delay",
        help="contract v2: impressions to kafka.impressions_topic and each positive's "
        "click to kafka.feedback_topic this much later: exp:MEAN, fixed:D, uniform:A:B, lognormal:MEDIAN:SIGMA "
        "or none (e.g. exp:20m)",
    ),
    delay_seed: int = typer.Option(0, "--delay-seed", help="seed of the --label-delay draws"),
) -> None:
    """Stream a dataset into Kafka in event-time order (idempotent producer, key = user id)."""
    from online_models.errors import ConfigError
    from reloop.config import load_config
    from reloop.datasets import DatasetError, load_dataset
    from reloop.replay import ReplayError, parse_speed, replay_delayed, replay_table

    try:
        cfg = load_config(config)
        table = load_dataset(dataset, limit=limit)
        if label_delay is not None:
            two = replay_delayed(
                table, cfg.kafka, label_delay, seed=delay_seed, speed=parse_speed(speed), progress=True
            )
            for s in (two.impressions, two.feedback):
                typer.echo(f"replayed {s.events:,} records to {s.topic} in {s.seconds:.2f}s")
            return
        stats = replay_table(
            table, cfg.kafka, topic=topic or cfg.kafka.events_topic, speed=parse_speed(speed), progress=True
        )
    except (ConfigError, DatasetError, ReplayError) as e:
        _fail_for(e)
    typer.echo(
        f"replayed {stats.events:,} events to {stats.topic} in {stats.seconds:.2f}s "
        f"({stats.events_per_s:,.0f} events/s)"
    )


@_command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def features(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="one micro-batch, then exit (the default)"),
    every: float | None = typer.Option(
        None, "--every", min=0.1, metavar="SECONDS", help="one micro-batch every SECONDS until interrupted"
    ),
    reset: bool = typer.Option(False, "--reset", help="forget the job's offsets and state, then exit"),
    runner: str | None = typer.Option(
        None,
        help="flink: the local Flink job server (started on "
        "demand), or a cluster with --flink_master=host:port; "
        "or any Beam runner (default: FnApiRunner)",
    ),
    config: str | None = typer.Option(None, help="YAML config file"),
) -> None:
    """Beam feature job: new Kafka offsets -> DLQ / windowed features -> Feast + training examples, offsets
    committed after the sinks. Other options go to python -m pipelines.feature_job (--max_events,
    --examples_uri, --state_uri, --feature_repo, and Beam options such as --runner=FlinkRunner)."""
    from pipelines.feature_job import main as job_main

    if once and every is not None:
        _fail("--once and --every are exclusive")
    from reloop.runners import RunnerError, runner_args, start_local_flink

    try:
        argv = runner_args(None if reset else runner, list(ctx.args), start_local_flink)
    except RunnerError as e:
        _fail(str(e))
    argv += ["--every", str(every)] if every is not None else ["--once"]
    argv += (["--reset"] if reset else []) + (["--config", config] if config else [])
    raise typer.Exit(job_main(argv))


@_command()
def run(
    dataset: str = typer.Option("movielens-100k", help="movielens-100k, synthetic:<scenario>, or a CSV/Parquet path"),
    model: str | None = typer.Option(None, help="lr, deepfm, dcnv2 or din (default: model.kind of the config, dcnv2)"),
    speed: str = typer.Option("max", help="'max', or 'Nx' for N times real time"),
    limit: int | None = typer.Option(None, min=1, help="only the first N events in time order"),
    inject_drift: str | None = typer.Option(
        None, help="abrupt_interest, gradual_interest, abrupt_ctr or abrupt_inversion"
    ),
    drift_at: float = typer.Option(0.6, help="where the injected drift starts, as a fraction of the stream"),
    resume: bool = typer.Option(False, "--resume", help="continue the latest (or --run-id) run"),
    run_id: str | None = typer.Option(None, help="name of the run (default: time + random)"),
    feature_every: float = typer.Option(3.0, help="seconds between feature-job micro-batches"),
    refresh: bool = typer.Option(
        True, "--refresh/--no-refresh", help="promote the incremental trainer's checkpoints (through the gate)"
    ),
    gate_margin: float | None = typer.Option(
        None,
        min=0.0,
        help="a retrained candidate must beat the served "
        "logloss by this fraction, beyond the gate's paired test "
        "(default: gate.margin of the config, 0)",
    ),
    refresh_every: int | None = typer.Option(
        None,
        min=100,
        help="examples the trainer learns between "
        "checkpoints offered to serving, through the paired gate "
        "(default: trainer.refresh_every of the config, 1000)",
    ),
    retrain_min_rows: int = typer.Option(3000, min=100, help="post-drift events a retrain waits for and trains on"),
    reports: str = typer.Option("reports", help="where reports/<run id>/ goes"),
    state_dir: str = typer.Option(".state/runs", help="where each run keeps its state (resume reads it)"),
    config: str | None = typer.Option(None, help="YAML config file"),
    profile: str = typer.Option(
        "embedded",
        help="embedded (in process) or cluster (Flink, Redis, two-node Ray, "
        "s3proxy: infra/cluster.yaml on this machine's services)",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="no live progress"),
    label_delay: str | None = typer.Option(
        None,
        "--label-delay",
        help="contract v2: replay impressions, and each positive's click this much later "
        "(exp:MEAN, fixed:D, uniform:A:B, lognormal:MEDIAN:SIGMA; e.g. exp:20m); the feature job joins them",
    ),
    attribution_window: str | None = typer.Option(
        None,
        "--attribution-window",
        help="with --label-delay: how long a click may follow its impression "
        "(e.g. 1h; default: feature_job.attribution_window_s of the config, 1h)",
    ),
    train_batch: int | None = typer.Option(
        None, min=1, help="the incremental trainer's mini-batch size (default: trainer.batch_size of the config, 256)"
    ),
    side_features: bool | None = typer.Option(
        None,
        "--side-features/--no-side-features",
        help="join the user profile and item catalogue (point in time, as Feast's batch views serve them) into "
        "training and serving, and encode them (ML-100K: from the wheel; default: trainer.side_features)",
    ),
    users: str | None = typer.Option(
        None, help="users side-table CSV (columns: reloop.side_tables); implies --side-features"
    ),
    items: str | None = typer.Option(
        None, help="items side-table CSV (columns: reloop.side_tables); implies --side-features"
    ),
) -> None:
    """Run the whole loop: replay -> Beam features -> Feast + examples -> Ray trainer -> serving with memory
    -> drift monitors -> retrain/redeploy. Writes reports/<run id>/report.html and summary.json."""
    import json

    from online_models.errors import ConfigError
    from online_models.settings import KINDS
    from reloop.datasets import DatasetError
    from reloop.profiles import ProfileError, profile_config
    from reloop.replay import ReplayError, parse_speed
    from reloop.run import LoopRun, RunError, RunOptions
    from reloop.services import ServiceError

    if model is not None and model not in KINDS:
        _fail(f"--model must be one of {', '.join(KINDS)}, got {model!r}")
    try:
        opts = RunOptions(
            dataset=dataset,
            model=model,
            speed=parse_speed(speed),
            limit=limit,
            inject_drift=inject_drift,
            drift_at=drift_at,
            resume=resume,
            run_id=run_id,
            feature_every_s=feature_every,
            progress=not quiet,
            report_root=reports,
            refresh=refresh,
            refresh_every=refresh_every,
            gate_margin=gate_margin,
            retrain_min_rows=retrain_min_rows,
            state_root=state_dir,
            label_delay=label_delay,
            attribution_window=attribution_window,
            train_batch=train_batch,
            side_features=True if (users or items) else side_features,
            users_path=users,
            items_path=items,
        )
        summary = LoopRun(_preflight(profile_config(profile, config)), opts).run()
    except (ConfigError, DatasetError, ReplayError, RunError, ProfileError, ServiceError) as e:
        _fail_for(e)
    v = summary["variants"]
    typer.echo(json.dumps({k: summary[k] for k in ("run_id", "seconds", "counts", "memory_auc_gain")}, indent=2))
    for name, m in v.items():
        typer.echo(
            f"{name:15s} n={m['n']:>7,}  AUC {m['auc'] or float('nan'):.4f}  gAUC "
            f"{m['gauc'] or float('nan'):.4f}  logloss {m['logloss'] or float('nan'):.4f}"
        )
    if summary.get("side_features"):
        typer.echo(f"side features: {', '.join(summary['side_features']['fields'])}")
    typer.echo(f"report: {summary['report_dir']}/report.html")
    if summary.get("errors"):
        _fail("run ended with errors:\n  " + "\n  ".join(summary["errors"]))


def _preflight(cfg):
    """Before anything is replayed: the Feast repo is found (from the config, else the installed package)
    and named by its absolute path, so the run does not depend on the working directory."""
    from pipelines.feast_io import resolve_repo

    repo = resolve_repo(cfg.feast)  # FileNotFoundError (exit 2) names what is missing
    return cfg.model_copy(update={"feast": cfg.feast.model_copy(update={"repo_path": str(repo)})})


@_command()
def evaluate(
    dataset: str = typer.Option("movielens-100k", help="movielens-100k, or a CSV/Parquet path"),
    model: str = typer.Option("dcnv2", help="lr, deepfm, dcnv2 or din (target attention over the user's last items)"),
    slots: int = typer.Option(10, min=1, help="equal test slots after the warm-up"),
    warmup: float = typer.Option(0.5, help="fraction of events (in time order) used to warm up the base model"),
    seed: int = typer.Option(0, help="seed of models, memory hyperplanes and River"),
    out: str = typer.Option("reports/evaluate.json", help="result JSON (a PNG of AUC per slot goes next to it)"),
    limit: int | None = typer.Option(None, min=1, help="only the first N events in time order"),
    batch_size: int = typer.Option(16, min=1, help="mini-batch size of test-then-train (16: chosen on validation)"),
    no_river: bool = typer.Option(False, help="skip the River baselines (faster)"),
    memory_key: str = typer.Option(
        SERVING_MEMORY["key"],
        help="memory key: 'hidden' (the model's last layer, as in "
        "ReLoop2), 'hidden+user' (plus the user embedding, chosen "
        "on validation) or 'hidden+ids' (plus user and item)",
    ),
    memory_write: str = typer.Option(
        "event",
        help="when outcomes reach the memory: 'event' (as each arrives, "
        "stream order), 'timestamp' (once its event time has passed), "
        "'batch' (after each mini-batch)",
    ),
    same_time: str = typer.Option(
        "stream",
        help="events with equal timestamps: 'stream' (spread by 1 ms in stream "
        "order, so features see the earlier events of their second) or "
        "'timestamp' (same-ms events do not see each other)",
    ),
    side_features: bool = typer.Option(
        False,
        help="join the user profile and item catalogue side tables "
        "(point in time) and encode them (ML-100K: from the wheel)",
    ),
    users: str | None = typer.Option(
        None, help="users side-table CSV (columns: reloop.side_tables); implies --side-features"
    ),
    items: str | None = typer.Option(
        None, help="items side-table CSV (columns: reloop.side_tables); implies --side-features"
    ),
    history_len: int | None = typer.Option(
        None, min=1, help="the user's last N items (default: the feature job's last_n)"
    ),
) -> None:
    """Chronological test-then-train evaluation: base, incremental, +memory, River baselines."""
    from reloop.datasets import DatasetError
    from reloop.evaluate import VARIANTS, EvaluationConfig, EvaluationError, evaluate_and_report

    try:
        variants = tuple(v for v in VARIANTS if not (no_river and v.startswith("river")))
        cfg = EvaluationConfig(
            dataset=dataset,
            model=model,
            slots=slots,
            warmup=warmup,
            seed=seed,
            limit=limit,
            batch_size=batch_size,
            variants=variants,
            memory_key=memory_key,
            memory_write=memory_write,
            same_time=same_time,
            side_features=side_features or bool(users or items),
            users_path=users,
            items_path=items,
            history_len=history_len,
        )
        evaluate_and_report(cfg, out)
    except (EvaluationError, DatasetError, ValueError) as e:
        _fail_for(e)


@app.command("side-tables")
def side_tables(
    dataset: str = typer.Option(
        "movielens-100k", help="movielens-100k (side tables from the wheel), or any name with --users/--items"
    ),
    users: str | None = typer.Option(None, help="users CSV (columns: reloop.side_tables)"),
    items: str | None = typer.Option(None, help="items CSV (columns: reloop.side_tables)"),
    config: str | None = typer.Option(None, help="YAML config file (its feast section)"),
) -> None:
    """Write the user profile / item catalogue batch sources (Parquet) and materialise them online with Feast."""
    from online_models.errors import DatasetError
    from reloop.config import load_config
    from reloop.side_tables import publish_side_tables

    try:
        written = publish_side_tables(load_config(config).feast, dataset, users, items)
    except (DatasetError, ValueError) as e:
        _fail(str(e))
    if not written:
        _fail(f"{dataset} has no side tables of its own: give --users and/or --items")
    typer.echo(", ".join(f"{view}: {n} rows" for view, n in written.items()) + " written and materialised")


_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _run_job(ctx: typer.Context, module: str, submit: bool, wait: bool, config: str | None) -> None:
    """Run ``python -m <module>`` in-process (embedded Ray) or submit it with ``ray job submit``."""
    import importlib

    args = list(ctx.args) + (["--config", config] if config else [])
    if submit:
        from online_models.errors import ConfigError
        from reloop.config import load_config
        from reloop.submit import submit as submit_job

        try:
            address = load_config(config).ray.jobs_address
        except ConfigError as e:
            _fail_for(e)
        raise typer.Exit(submit_job(module, list(ctx.args), address, wait=wait, config=config))
    raise typer.Exit(importlib.import_module(module).main(args))


@_command(context_settings=_PASSTHROUGH)
def train(
    ctx: typer.Context,
    submit: bool = typer.Option(False, help="submit to the Ray cluster (ray.jobs_address) instead of local"),
    wait: bool = typer.Option(True, help="with --submit: follow the job's logs until it ends"),
    config: str | None = typer.Option(None, help="YAML config file"),
) -> None:
    """Incremental trainer (test-then-train, checkpoints, exact resume). Other options go to python -m jobs.trainer
    (--examples, --checkpoint-dir, --registry, --model, --idle-exit, --publish-every, --promote; see --help there)."""
    _run_job(ctx, "jobs.trainer", submit, wait, config)


@_command(context_settings=_PASSTHROUGH)
def retrain(
    ctx: typer.Context,
    submit: bool = typer.Option(False, help="submit to the Ray cluster (ray.jobs_address) instead of local"),
    wait: bool = typer.Option(True, help="with --submit: follow the job's logs until it ends"),
    config: str | None = typer.Option(None, help="YAML config file"),
) -> None:
    """Full retrain on Ray Train -> a candidate registry version with holdout metrics. Other options go to
    python -m jobs.retrain (--window-days, --workers, --epochs, --model, --promote; see --help there)."""
    _run_job(ctx, "jobs.retrain", submit, wait, config)


@_command(context_settings=_PASSTHROUGH)
def serve(ctx: typer.Context, config: str | None = typer.Option(None, help="YAML config file")) -> None:
    """Scoring service: POST /score, POST /feedback, GET /health on 127.0.0.1:8000. Other options go to
    python -m jobs.serve (--port, --backend http|ray, --no-memory, --registry, --feast-repo, and
    --impressions-topic / --feedback-topic: log every scored candidate and every click as contract v2 on
    Kafka, the topics of the config's kafka section when given bare)."""
    from jobs.serve import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args) + (["--config", config] if config else [])))


@_command()
def score(
    user_id: str = typer.Argument(..., help="user id"),
    item_id: str = typer.Argument(..., help="item id"),
    context: list[str] = typer.Option([], "--context", "-c", help="key=value context field (repeatable)"),
    feedback: int | None = typer.Option(None, min=0, max=1, help="then send this label for the request"),
    url: str = typer.Option("http://127.0.0.1:8000", help="scoring service URL"),
) -> None:
    """Score one (user, item) with the scoring service; optionally send the outcome back."""
    import json as _json

    import requests

    ctx_fields = {}
    for kv in context:
        k, eq, v = kv.partition("=")
        if not eq:
            _fail(f"--context {kv!r}: expected key=value")
        ctx_fields[k] = v
    import os

    token = os.environ.get("RELOOP_SERVE_TOKEN")  # the service's bearer token, when it requires one
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.post(
            f"{url}/score",
            json={"user_id": user_id, "item_id": item_id, "context": ctx_fields},
            timeout=10,
            headers=headers,
        )
        if r.status_code != 200:
            _fail(f"{r.status_code}: {r.json().get('error', r.text)}")
        out = r.json()
        typer.echo(_json.dumps(out))
        if feedback is not None:
            f = requests.post(
                f"{url}/feedback",
                json={"impression_id": out["impression_id"], "label": feedback},
                timeout=10,
                headers=headers,
            )
            if f.status_code != 200:
                _fail(f"feedback {f.status_code}: {f.json().get('error', f.text)}")
            typer.echo(_json.dumps(f.json()))
    except requests.RequestException as e:
        _fail(f"{url}: {e}")


@_command()
def monitor(
    config: str | None = typer.Option(None, help="YAML config file (sections drift and hooks)"),
    topic: str | None = typer.Option(None, help="predictions topic (default: drift.predictions_topic)"),
    from_beginning: bool = typer.Option(False, help="start at the earliest offset when the group has none"),
    max_records: int | None = typer.Option(None, min=1, help="stop after N records"),
    idle_timeout: float | None = typer.Option(None, help="stop after this many seconds without records"),
    actions: str | None = typer.Option(
        None, help="module:factory returning an Actions object, called with the config (default: alert only)"
    ),
) -> None:
    """Run the drift monitors on the served predictions joined with labels; alert, retrain, roll back."""
    from jobs.alerts import HookError, resolve_entry_point
    from jobs.monitor import run_monitor
    from online_models.errors import ConfigError
    from reloop.config import load_config

    try:
        cfg = load_config(config)
        acts = resolve_entry_point(actions)(cfg) if actions else None
        stats = run_monitor(
            cfg,
            topic=topic,
            from_beginning=from_beginning,
            max_records=max_records,
            idle_timeout_s=idle_timeout,
            actions=acts,
        )
    except (ConfigError, HookError, ValueError) as e:
        _fail_for(e)
    typer.echo(
        f"monitored {stats.records:,} records ({stats.rejected:,} rejected) in {stats.seconds:.1f}s; "
        f"requests: {stats.requests or 'none'}"
    )


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # python -m reloop.cli
    main()
