"""How a worker connects and behaves: its typed settings, read from SLUICEGATE_WORKER_* variables."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode

from sluicegate.durations import PositiveDuration
from sluicegate.errors import InvalidInput
from sluicegate.settings import settings_config
from sluicegate.validation import DEFAULT_MAX_PAYLOAD, check_labels, parse_labels


class WorkerSettings(BaseSettings):
    """How a worker connects and behaves; SLUICEGATE_WORKER_* variables."""

    model_config = settings_config("SLUICEGATE_WORKER_")

    dispatchers: str = Field(default="127.0.0.1:50051", min_length=3, description="Comma-separated host:port list.")
    slots: int = Field(default=10, ge=1, le=10_000, description="Tasks run at once.")
    tenant: str = "default"
    # NoDecode: the variable is `k=v,k2=v2`, not JSON.
    labels: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="Labels the worker carries, k=v,k2=v2."
    )
    heartbeat_interval: PositiveDuration = timedelta(seconds=2)
    keepalive_time: PositiveDuration = timedelta(seconds=1)
    keepalive_timeout: PositiveDuration = timedelta(seconds=1)
    reconnect_max_backoff: PositiveDuration = timedelta(seconds=5)
    shutdown_grace: PositiveDuration = timedelta(seconds=10)
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=1, le=64 * 1024 * 1024)

    @field_validator("dispatchers")
    @classmethod
    def _dispatchers(cls, value: str) -> str:
        """Each address is host:port (or a gRPC target such as dns:///host:port): a typo is refused, not retried."""
        for i, part in enumerate(p.strip() for p in value.split(",")):
            which = f"address {i + 1}"
            if not part:
                raise ValueError(f"{which} is empty")
            if "/" in part:  # a gRPC target URI: grpc parses it
                continue
            _, sep, port = part.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{which} must be host:port with a port between 1 and 65535")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        try:
            if isinstance(value, str):
                return parse_labels(value)
            if isinstance(value, dict):
                check_labels(value)
        except InvalidInput as err:
            raise ValueError(str(err)) from err
        return value
