"""Settings of the scheduler, read from SLUICEGATE_SCHEDULER_* variables and flags."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from sluicegate.durations import Duration, PositiveDuration
from sluicegate.errors import InvalidInput
from sluicegate.settings import settings_config
from sluicegate.validation import DEFAULT_MAX_PAYLOAD
from sluicegate_scheduler.limits import parse_counts, parse_rates


class SchedulerSettings(BaseSettings):
    """How the scheduler assigns, parks, retries and gives up."""

    model_config = settings_config("SLUICEGATE_SCHEDULER_")

    max_dispatch_attempts: int = Field(
        default=5, ge=1, le=1000, description="Dispatch attempts before a task goes to the dead queue."
    )
    intake_prefetch: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Task messages read ahead per intake queue (times the tenant's weight).",
    )
    lane_prefetch: int = Field(default=8, ge=1, le=1000, description="Parked messages read ahead per lane.")
    requeue_prefetch: int = Field(default=512, ge=1, le=65535, description="Requeued messages read ahead.")
    dispatcher_stale_after: PositiveDuration = Field(
        default=timedelta(seconds=5), description="A dispatcher silent this long is taken out of the view."
    )
    worker_cooldown: PositiveDuration = Field(
        default=timedelta(seconds=5),
        description="After a stalled or lost dispatch, a worker gets work only when no other can take it.",
    )
    max_batch: int = Field(default=64, ge=1, le=1000, description="Most assignments in one AMQP message.")
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=1, le=64 * 1024 * 1024)
    max_lanes: int = Field(
        default=1000, ge=1, le=100_000, description="Lanes before keyed tasks share one overflow lane per action."
    )
    max_waiting_per_tenant: int = Field(
        default=1_000_000,
        ge=0,
        le=1_000_000_000,
        description="Tasks one tenant may have waiting; past it a submission ends REJECTED (0: no limit).",
    )
    lane_idle: PositiveDuration = Field(
        default=timedelta(minutes=1), description="An empty lane is deleted after this (declared again when needed)."
    )
    requeue_hold: PositiveDuration = Field(
        default=timedelta(seconds=1),
        description="A requeued task waits this long ahead of its lane for a worker, then is parked.",
    )
    held_budget_mb: int = Field(
        default=256, ge=1, le=64 * 1024, description="MiB of tasks held in memory before lanes stop being read."
    )
    concurrency: str = Field(
        default="",
        description="Caps on running tasks per concurrency key: action=N (any key), action:key=N; comma-separated.",
    )
    rate_limits: str = Field(
        default="", description="Token buckets per key: action=N/period or action:key=N/period, comma-separated."
    )
    fairness_weights: str = Field(default="", description="Shares of fairness keys: key=weight, comma-separated.")
    tenant_weights: str = Field(default="", description="Shares of tenants' intakes: tenant=weight, comma-separated.")
    partition: int = Field(
        default=0,
        ge=0,
        le=63,
        description="Which scheduler partition this scheduler leads or stands by for (below SLUICEGATE_PARTITIONS).",
    )
    slot_share: Literal["exact", "eager"] = Field(
        default="exact",
        description=(
            "How partitions share a worker's free slots: exact (the claims add up to what the dispatcher reports) or"
            " eager (idle slots rounded up: none left unclaimed, at most P-1 too many, turned away as NO_SLOT)."
        ),
    )
    synthetic_cost: Duration = Field(
        default=timedelta(0),
        description="Work added to every placement, for benchmarks that make the scheduler the bottleneck; 0 in use.",
    )
    synthetic_wait: bool = Field(
        default=False, description="The synthetic cost blocks without using the CPU (a model of one core each)."
    )
    heartbeat: int = Field(
        default=5, ge=1, le=60, description="AMQP heartbeat in seconds: a hung scheduler loses its lead after ~3x."
    )

    @field_validator("synthetic_cost")
    @classmethod
    def _cost(cls, value: timedelta) -> timedelta:
        if not timedelta(0) <= value <= timedelta(seconds=1):
            raise ValueError("must be between 0 and 1s")
        return value

    @field_validator("concurrency")
    @classmethod
    def _counts(cls, value: str) -> str:
        return _valid(lambda: parse_counts(value, "concurrency", low=1), value)

    @field_validator("fairness_weights", "tenant_weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        return _valid(lambda: parse_counts(value, "weights", low=1, high=100), value)

    @field_validator("rate_limits")
    @classmethod
    def _rates(cls, value: str) -> str:
        return _valid(lambda: parse_rates(value, "rate limits"), value)


def _valid(check: Callable[[], Any], value: str) -> str:
    try:
        check()
    except InvalidInput as err:
        raise ValueError(str(err)) from err
    return value
