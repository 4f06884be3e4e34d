"""Shared fixtures. Integration tests (marked ``integration``) use the real services
started by ``infra/`` scripts (``reloop up``); each test uses its own topic names."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def unique_topic() -> str:
    """A fresh topic name per test, so tests never see each other's events."""
    return f"test.{uuid.uuid4().hex[:12]}"
