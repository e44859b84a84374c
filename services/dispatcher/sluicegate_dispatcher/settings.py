"""Settings of the dispatcher, read from SLUICEGATE_DISPATCHER_* variables and flags."""

from __future__ import annotations

import socket
import uuid
from datetime import timedelta
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from sluicegate.durations import PositiveDuration
from sluicegate.settings import NAME_PATTERN, settings_config
from sluicegate.validation import DEFAULT_MAX_PAYLOAD


def _default_id() -> str:
    host = "".join(c for c in socket.gethostname().lower() if c.isalnum() or c in "-_")[:24] or "host"
    return f"{host}-{uuid.uuid4().hex[:8]}"


class DispatcherSettings(BaseSettings):
    """How a dispatcher serves workers and consumes its inbox."""

    model_config = settings_config("SLUICEGATE_DISPATCHER_")

    id: str = Field(
        default_factory=_default_id, pattern=NAME_PATTERN, description="Routing key of this dispatcher's inbox."
    )
    listen: str = Field(default="127.0.0.1:50051", min_length=3, description="host:port the gRPC server binds.")
    send_lock_timeout: PositiveDuration = Field(
        default=timedelta(milliseconds=250), description="Longest wait for a worker's send lock before requeueing."
    )
    ack_timeout: PositiveDuration = Field(
        default=timedelta(seconds=2), description="A worker must acknowledge receipt of an assignment within this."
    )
    heartbeat_interval: PositiveDuration = Field(
        default=timedelta(seconds=2), description="How often workers are told to heartbeat."
    )
    heartbeat_timeout: PositiveDuration = Field(
        default=timedelta(seconds=6), description="A worker silent this long is lost; its leases are requeued."
    )
    reconnect_grace: PositiveDuration = Field(
        default=timedelta(milliseconds=500),
        description="A worker whose stream dropped must show life within this, or its leases are requeued.",
    )
    keepalive_time: PositiveDuration = Field(
        default=timedelta(seconds=1), description="gRPC keepalive ping interval (workers use the same)."
    )
    keepalive_timeout: PositiveDuration = Field(
        default=timedelta(seconds=1), description="A keepalive ping unanswered this long drops the connection."
    )
    receipt_window: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="Most assignments a worker may have unacknowledged at once (never more than its slots).",
    )
    worker_prefetch: int = Field(
        default=4,
        ge=0,
        le=10_000,
        description="Assignments a worker may have queued here beyond its free slots (at most its slots), "
        "sent as slots free, highest priority first: the refill of a slot skips the round trip to the scheduler. "
        "Deeper queues trade fairness between keys (a key queued here goes first) for throughput.",
    )
    prefetch: int = Field(default=2000, ge=1, le=65535, description="Unsettled inbox messages held at once.")
    inbox_ttl: PositiveDuration = Field(
        default=timedelta(seconds=30),
        description="An inbox message unsettled this long after a crash dead-letters to requeue.",
    )
    inbox_expires: PositiveDuration = Field(
        default=timedelta(minutes=10), description="An inbox with no consumer this long is deleted (after it drained)."
    )
    state_heartbeat: PositiveDuration = Field(
        default=timedelta(seconds=1), description="Worker state is republished at least this often."
    )
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=1, le=64 * 1024 * 1024)
    run_grace: PositiveDuration = Field(
        default=timedelta(seconds=5),
        description="A task with a timeout not finished within it and this grace is stopped and failed (or retried).",
    )
    cancel_grace: PositiveDuration = Field(
        default=timedelta(seconds=5),
        description="A worker told to stop a cancelled task has this long to say so; then it ends cancelled anyway.",
    )
    drain_grace: PositiveDuration = Field(
        default=timedelta(seconds=10), description="How long a stopping dispatcher waits for running tasks."
    )
    send_lock_permits: int = Field(default=1, ge=1, le=64, description="Concurrent writes allowed per stream.")
    # Limits on what one party may ask; past any of them the call answers RESOURCE_EXHAUSTED.
    max_sessions_per_principal: int = Field(
        default=1000, ge=1, le=1_000_000, description="Open sessions per principal (identity, else peer host)."
    )
    max_sessions_per_tenant: int = Field(default=5000, ge=1, le=1_000_000, description="Open sessions per tenant.")
    max_actions: int = Field(default=64, ge=1, le=10_000, description="Action names one worker may register.")
    max_action_chars: int = Field(
        default=4096, ge=128, le=1_000_000, description="Characters of all action names of one registration."
    )
    max_labels: int = Field(default=32, ge=0, le=32, description="Labels one worker may register.")
    max_label_chars: int = Field(
        default=4096, ge=0, le=1_000_000, description="Characters of all label keys and values of one registration."
    )
    max_events_per_message: int = Field(
        default=1000, ge=1, le=100_000, description="Task events in one worker message, checked before applying any."
    )
    register_rate: float = Field(
        default=20.0, ge=0, le=1_000_000, description="Registrations a second per principal (0: no limit)."
    )
    register_burst: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Registrations at once per principal (its sessions: a fleet on one host starts at once).",
    )
    heartbeat_rate: float = Field(
        default=10.0, ge=0, le=1_000_000, description="Empty messages (heartbeats) a second per session (0: no limit)."
    )
    heartbeat_burst: int = Field(default=50, ge=1, le=1_000_000, description="Heartbeats at once per session.")
    tls_cert: Path | None = Field(default=None, description="PEM certificate (chain) the gRPC server presents.")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        default=None, description="CA bundle client certificates are verified against; a verified one names a worker."
    )
    tls_require_client_cert: bool = Field(default=False, description="Refuse TLS clients without a certificate.")
    auth_keys: Path | None = Field(
        default=None, description="JSON key set tokens are verified with; read again when the file changes."
    )
    insecure: bool = Field(
        default=False, description="Allow listening beyond loopback without TLS and credentials (never in production)."
    )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authenticated(self) -> bool:
        """Whether every call must present credentials (a token or a verified client certificate)."""
        return self.auth_keys is not None or self.tls_client_ca is not None

    @model_validator(mode="after")
    def _tls_pairs(self) -> DispatcherSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("SLUICEGATE_DISPATCHER_TLS_CERT and SLUICEGATE_DISPATCHER_TLS_KEY go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("SLUICEGATE_DISPATCHER_TLS_CLIENT_CA needs SLUICEGATE_DISPATCHER_TLS_CERT and _KEY")
        if self.tls_require_client_cert and self.tls_client_ca is None:
            raise ValueError("SLUICEGATE_DISPATCHER_TLS_REQUIRE_CLIENT_CERT needs SLUICEGATE_DISPATCHER_TLS_CLIENT_CA")
        return self

    @model_validator(mode="after")
    def _inbox_outlives_its_messages(self) -> DispatcherSettings:
        # A deleted queue does not dead-letter what it holds: it must expire only after draining.
        if self.inbox_expires < 2 * self.inbox_ttl:
            raise ValueError(
                "SLUICEGATE_DISPATCHER_INBOX_EXPIRES must be at least twice SLUICEGATE_DISPATCHER_INBOX_TTL"
            )
        return self
