"""The embedded Ray instance, bound to loopback with its metrics kept local.

``ray.init()`` with no address starts a private cluster whose processes, left
to their defaults, bind on every interface and export unauthenticated
Prometheus metrics on 0.0.0.0. :func:`init_local` is the one place reloop
starts an embedded Ray:

- ``_node_ip_address="127.0.0.1"`` with Ray's single-machine mode
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; otherwise Ray replaces a loopback
  node address by the host's IP): the node registers, and its agents listen,
  on loopback (the agents pick loopback when the node address is);
- ``RAY_enable_metrics_collection=0``: no metrics exporter at all (nothing to
  scrape, so nothing to expose); no dashboard, no usage stats.

Measured on Ray 2.60 (``tests/test_services_security.py``): with these settings
every Ray process (GCS, raylet, workers, dashboard and runtime-env agents)
listens on 127.0.0.1 only (``::ffff:127.0.0.1``), and no metrics port exists.
Without them: GCS, raylet and workers on ``::``, the metrics agent on 0.0.0.0,
the runtime-env agent on the host's IP. Ray's token authentication (on by
default in 2.60) stays on.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"


def init_local(**kwargs: Any) -> None:
    """``ray.init`` of a private local cluster on loopback (no-op if Ray is already initialised).

    Keyword arguments pass through (``num_cpus``, ``runtime_env``, ``log_to_driver``...).
    """
    # read by the processes ray.init starts (they inherit this environment)
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray turns a loopback node address into the host's reachable IP unless clusters are "disabled" (its
    # single-machine mode for laptops): then the node, and its agents, stay on loopback
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray after the settings above, at call time: it reads its environment (and its token auth, which the
    # cluster profile sets after this module is imported) when its core library loads
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    ray_constants.ENABLE_RAY_CLUSTER = False  # the env var is read at import; ray may be imported already
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("_node_ip_address", LOOPBACK)
    ray.init(**kwargs)
