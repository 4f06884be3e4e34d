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
    from pipelines.config import KafkaConfig
    from reloop import services

    services.get("kafka").start()
    return KafkaConfig(bootstrap_servers=services.KAFKA_BOOTSTRAP)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared local Redis (started on demand, idempotently), as host:port."""
    from reloop import services

    services.get("redis").start()
    return services.get("redis").connection_string()
