"""Fixtures for the Flink tests: the local Beam Flink job server (``reloop up --with flink``).

Import the fixture into a test module (``from tests.flink_support import flink_job_endpoint``). The
server is shared and started idempotently; if this session started it, it is stopped (by pid) at the end,
so a test run does not leave a 1 GiB JVM behind.
"""

from __future__ import annotations

import pytest


def flink_args(endpoint: str, parallelism: int = 2) -> list[str]:
    """Beam flags that run a pipeline on the local job server; the Python workers live in this process."""
    return ["--runner=PortableRunner", f"--job_endpoint={endpoint}", "--environment_type=LOOPBACK",
            f"--parallelism={parallelism}"]


@pytest.fixture(scope="session")
def flink_job_endpoint() -> str:
    from reloop import services

    svc = services.get("flink")
    was_up = svc.status().running
    try:
        svc.start()
    except services.ServiceError as e:
        pytest.fail(f"the Flink job server did not start: {e}")
    yield svc.address()
    if not was_up:
        svc.stop()
