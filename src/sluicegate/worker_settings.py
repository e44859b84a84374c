"""How a worker connects and behaves: its typed settings, read from SLUICEGATE_WORKER_* variables."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
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
    token: SecretStr | None = Field(default=None, description="Token sent with every call (sluicegate token issue).")
    token_file: Path | None = Field(
        default=None, description="File holding the token, read again at every registration (rotation, no restart)."
    )
    tls: bool = Field(default=False, description="Speak TLS to dispatchers (on by itself when tls_ca is set).")
    tls_ca: Path | None = Field(default=None, description="CA bundle dispatchers' certificates are verified against.")
    tls_cert: Path | None = Field(default=None, description="Client certificate (mTLS): names this worker.")
    tls_key: Path | None = Field(default=None, description="Private key of tls_cert.")
    tls_server_name: str | None = Field(
        default=None, max_length=253, description="Name the dispatchers' certificate must carry, if not their host."
    )

    @model_validator(mode="after")
    def _tls(self) -> WorkerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("SLUICEGATE_WORKER_TLS_CERT and SLUICEGATE_WORKER_TLS_KEY go together")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set SLUICEGATE_WORKER_TOKEN or SLUICEGATE_WORKER_TOKEN_FILE, not both")
        return self

    @property
    def secure(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def current_token(self) -> str | None:
        """The token to present now: the setting, or the file's content as it is at this moment."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip() or None
        except OSError as err:
            raise InvalidInput(f"cannot read the token file {self.token_file.name!r}: {err.strerror}") from None

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
