"""Run a ``jobs.<name>`` module locally or submit it to a Ray cluster with ``ray job submit``.

A submitted job runs in an uploaded copy of the working directory, so relative
paths given to it would point inside that copy: :func:`absolute_paths` makes
the path options absolute first. The upload leaves out the venv, the state
dir and other bulky local directories (``RAY_EXCLUDES``); the job runs with
this machine's venv Python (the cluster of ``reloop up ray`` is local).

>>> absolute_paths(["--examples", "data/ex", "--registry", "s3://b/m", "--batch-size", "64"], "/repo")
['--examples', '/repo/data/ex', '--registry', 's3://b/m', '--batch-size', '64']
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.trainer import RAY_EXCLUDES
from reloop.config import load_config
from reloop.services import ray_client_env

REPO = Path(__file__).resolve().parent.parent
PATH_OPTIONS = ("--examples", "--checkpoint-dir", "--registry", "--storage-path", "--config", "--feast-repo")


def absolute_paths(args: list[str], base: str | None = None) -> list[str]:
    """Make the values of path options absolute (URIs with ``://`` are left alone)."""
    base = base or os.getcwd()
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in PATH_OPTIONS and "://" not in out[i + 1]:
            out[i + 1] = os.path.normpath(os.path.join(base, out[i + 1]))
    for i, a in enumerate(out):
        name, eq, val = a.partition("=")
        if eq and name in PATH_OPTIONS and "://" not in val:
            out[i] = f"{name}={os.path.normpath(os.path.join(base, val))}"
    return out


def defaults_from_config(module: str, args: list[str], config: str | None) -> list[str]:
    """Fill the path options the job would take from the config, so the job sees absolute paths."""

    cfg = load_config(config)
    given = {a.partition("=")[0] for a in args}
    extra: list[str] = []
    if "--examples" not in given:
        extra += ["--examples", cfg.storage.examples_uri]
    if "--registry" not in given:
        extra += ["--registry", cfg.storage.registry_uri]
    if module == "jobs.trainer" and "--checkpoint-dir" not in given:
        extra += [
            "--checkpoint-dir",
            os.path.join(os.path.dirname(os.path.abspath(cfg.storage.examples_uri)), "trainer"),
        ]
    return [*args, *extra]


def submit(module: str, args: list[str], address: str, wait: bool = True, config: str | None = None) -> int:
    """``ray job submit --working-dir <repo> -- python -m <module> <args>``; returns the CLI's exit code."""

    job_args = absolute_paths(defaults_from_config(module, args, config))
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": RAY_EXCLUDES}),
    ]
    if not wait:
        cmd.append("--no-wait")
    cmd += ["--", sys.executable, "-m", module, *job_args]
    return subprocess.call(cmd, env={**os.environ, **ray_client_env()})
