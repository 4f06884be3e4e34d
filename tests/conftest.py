"""Shared fixtures. Integration tests (marked ``integration``) use the real services
started by ``infra/`` scripts (``reloop up``); each test uses its own topic names."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def unique_topic() -> str:
    """A fresh topic name per test, so tests never see each other's events."""
    return f"test.{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def kafka_config():
    """The shared local broker (started on demand, idempotently) as a KafkaConfig."""
    from reloop import services
    from pipelines.config import KafkaConfig

    services.get("kafka").start()
    return KafkaConfig(bootstrap_servers=services.KAFKA_BOOTSTRAP)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared local Redis (started on demand, idempotently), as host:port."""
    from reloop import services

    services.get("redis").start()
    return services.get("redis").connection_string()


#: tests that change process-wide Ray state: token auth is read once per process when Ray's core library
#: loads, and a killed worker node lingers in the head's view for a while; they run last, so no other test
#: inherits that state
_LAST = ("test_cluster_profile.py", "test_cluster_ray.py", "test_s3_storage.py")


def pytest_collection_modifyitems(config, items):
    late = [i for i in items if i.path.name in _LAST]
    items[:] = [i for i in items if i.path.name not in _LAST] + late
