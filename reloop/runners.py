"""Which Beam runner a job runs on: ``--runner flink`` means the local Flink job server (or a cluster).

``reloop features --runner flink`` is shorthand for Beam's portable runner on the job server that
``reloop up --with flink`` starts (embedded Flink, Python workers in-process, no Docker); with
``--flink_master=host:port`` it is Beam's ``FlinkRunner`` on that cluster instead. Any other runner name
and every other Beam flag pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

from online_models.errors import ReloopError
from reloop import services


class RunnerError(ReloopError, RuntimeError):
    """The requested runner cannot be used: e.g. the local Flink job server did not start."""


#: parallelism of the local Flink job (the machine's cores are shared with Kafka and the trainers)
LOCAL_FLINK_PARALLELISM = 2


def _has(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def runner_args(runner: str | None, args: list[str], start_local_flink: Callable[[], str] | None = None) -> list[str]:
    """Beam flags for ``runner`` followed by ``args``; ``start_local_flink()`` returns the job endpoint.

    >>> runner_args(None, ["--max_events=5"])
    ['--max_events=5']
    >>> runner_args("flink", [], lambda: "localhost:8099")
    ['--runner=PortableRunner', '--job_endpoint=localhost:8099', '--environment_type=LOOPBACK', '--parallelism=2']
    >>> runner_args("flink", ["--parallelism=1"], lambda: "localhost:8099")[-1]
    '--parallelism=1'
    >>> runner_args("flink", ["--flink_master=jm:8081"])
    ['--runner=FlinkRunner', '--flink_master=jm:8081']
    >>> runner_args("DataflowRunner", ["--project=p"])
    ['--runner=DataflowRunner', '--project=p']
    """
    if runner is None:
        return list(args)
    if runner.lower() != "flink":
        return [f"--runner={runner}", *args]
    if _has(args, "--flink_master"):
        return ["--runner=FlinkRunner", *args]
    if start_local_flink is None:
        raise RunnerError("runner 'flink' without --flink_master needs the local job server")
    endpoint = start_local_flink()
    out = ["--runner=PortableRunner", f"--job_endpoint={endpoint}", "--environment_type=LOOPBACK"]
    if not _has(args, "--parallelism"):
        out.append(f"--parallelism={LOCAL_FLINK_PARALLELISM}")
    return [*out, *args]


def start_local_flink() -> str:
    """Start the local job server (idempotent) and return its job endpoint."""

    try:
        return services.get("flink").start().address
    except services.ServiceError as e:
        raise RunnerError(f"local Flink job server: {e}") from e
