"""Settings of the scheduler, read from SLUICEGATE_SCHEDULER_* variables and flags."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings

from sluicegate.durations import PositiveDuration
from sluicegate.settings import settings_config
from sluicegate.validation import DEFAULT_MAX_PAYLOAD


class SchedulerSettings(BaseSettings):
    """How the scheduler assigns, retries and gives up."""

    model_config = settings_config("SLUICEGATE_SCHEDULER_")

    max_dispatch_attempts: int = Field(
        default=5, ge=1, le=1000, description="Dispatch attempts before a task goes to the dead queue."
    )
    prefetch: int = Field(default=5000, ge=1, le=65535, description="Unsettled task messages held at once.")
    dispatcher_stale_after: PositiveDuration = Field(
        default=timedelta(seconds=5), description="A dispatcher silent this long is taken out of the view."
    )
    worker_cooldown: PositiveDuration = Field(
        default=timedelta(seconds=5),
        description="After a stalled or lost dispatch, a worker gets work only when no other can take it.",
    )
    max_batch: int = Field(default=64, ge=1, le=1000, description="Most assignments in one AMQP message.")
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=1, le=64 * 1024 * 1024)
    remember_requeues: int = Field(
        default=200_000, ge=1000, description="Requeued attempts remembered to drop duplicates."
    )
