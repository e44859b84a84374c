"""The benchmark's tests run against the broker at RABBITMQ_URL (the local one by default)."""

from __future__ import annotations

import os

import pytest

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    return os.environ.get("RABBITMQ_URL", DEFAULT_URL)
