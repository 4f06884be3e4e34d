"""Named profiles of ``reloop run``: ``embedded`` (the default: everything in process) and ``cluster``.

``cluster`` is ``infra/cluster.yaml`` with the addresses of the services ``reloop up`` runs on this
machine (their ports follow the ``RELOOP_*_PORT`` variables, as everywhere), and the environment that
reaches them: the Ray head's token and, unless ``AWS_ENDPOINT_URL`` already names an object store, the
local s3proxy's endpoint and generated keys. :func:`start_cluster_services` brings those services up.

>>> sorted(PROFILES)
['cluster', 'embedded']
"""

from __future__ import annotations

import os
from pathlib import Path

from online_models.errors import ReloopError
from reloop import services
from reloop.config import ReloopConfig, load_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "infra" / "cluster.yaml"
PROFILES = ("embedded", "cluster")
#: the Ray worker nodes the cluster profile runs on this machine
CLUSTER_RAY_WORKERS = 1


class ProfileError(ReloopError, ValueError):
    """An unknown profile, or a profile whose services are not reachable."""


def cluster_config(path: str | Path = CLUSTER_YAML) -> ReloopConfig:
    """The cluster profile for this machine's services; updates ``os.environ`` (Ray token, S3 endpoint)."""

    cfg = load_config(path)
    os.environ.update(services.ray_client_env())
    if "AWS_ENDPOINT_URL" not in os.environ:  # no other object store named: the local s3proxy
        os.environ.update(services.s3_client_env())
    return cfg.model_copy(
        update={
            "kafka": cfg.kafka.model_copy(update={"bootstrap_servers": services.KAFKA_BOOTSTRAP}),
            "feast": cfg.feast.model_copy(update={"redis_connection_string": services.REDIS_URL}),
            "ray": cfg.ray.model_copy(update={"address": services.RAY_ADDRESS, "jobs_address": services.RAY_DASHBOARD}),
        }
    )


def start_cluster_services(workers: int = CLUSTER_RAY_WORKERS) -> None:
    """s3proxy, Redis, the Ray head + ``workers`` nodes and the Flink job server (idempotent)."""

    services.S3Proxy().start()
    services.get("redis").start()
    services.start_ray(workers=workers)
    services.get("flink").start()


def profile_config(name: str, config: str | None = None) -> ReloopConfig:
    """The config of profile ``name`` (``config``: a YAML file that replaces the profile's own)."""
    if name == "embedded":
        return load_config(config)
    if name == "cluster":
        start_cluster_services()
        return cluster_config(config or CLUSTER_YAML)
    raise ProfileError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
