"""Settings of the recorder, read from SLUICEGATE_RECORDER_* variables and flags."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings

from sluicegate.durations import LongDuration, PositiveDuration
from sluicegate.settings import settings_config


class RecorderSettings(BaseSettings):
    """How the recorder consumes lifecycle events and keeps task records."""

    model_config = settings_config("SLUICEGATE_RECORDER_")

    prefetch: int = Field(
        default=64, ge=1, le=65535, description="Lifecycle messages (each a batch of events) held at once."
    )
    max_batch_events: int = Field(
        default=5000, ge=1, le=1_000_000, description="Most events written in one transaction."
    )
    writers: int = Field(default=2, ge=1, le=16, description="Write transactions in flight at once.")
    max_output_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        le=16 * 1024 * 1024,
        description="Longest output (and error) kept per task; the full size is recorded beside it.",
    )
    retention: LongDuration = Field(
        default=timedelta(days=7), description="A task record unchanged this long is deleted, with its history."
    )
    prune_interval: PositiveDuration = Field(
        default=timedelta(minutes=10), description="How often old records are pruned."
    )
    retry_max_backoff: PositiveDuration = Field(
        default=timedelta(seconds=5), description="Longest wait between two tries while the store is down."
    )
    shutdown_grace: PositiveDuration = Field(
        default=timedelta(seconds=10), description="On SIGTERM, how long events in hand may take to be written."
    )
