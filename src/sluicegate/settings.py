"""Typed settings shared by every role, and the one-line rendering of a bad setting."""

from __future__ import annotations

import ssl
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from sluicegate.durations import PositiveDuration
from sluicegate.errors import InvalidInput

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"

S = TypeVar("S", bound=BaseSettings)


def split_urls(text: str) -> tuple[str, ...]:
    """The broker addresses in a comma-separated list, each checked; an error never quotes one (secrets)."""
    parts = [part.strip() for part in text.split(",")]
    for i, part in enumerate(parts, 1):
        which = f"address {i} of {len(parts)}" if len(parts) > 1 else "the address"
        if not part:
            raise ValueError(f"{which} is empty")
        try:
            url = URL(part)
            port = url.port
        except (ValueError, TypeError):
            raise ValueError(f"{which} is not a valid URL") from None  # the parser's text could quote it
        if url.scheme not in ("amqp", "amqps") or not url.host:
            raise ValueError(f"{which} must be an amqp:// or amqps:// URL with a host")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"{which} has a port out of range")
    return tuple(parts)


def settings_config(env_prefix: str) -> SettingsConfigDict:
    """The configuration every settings class shares: an env prefix, no secret ever echoed."""
    return SettingsConfigDict(
        env_prefix=env_prefix,
        extra="forbid",
        hide_input_in_errors=True,
        validate_default=True,
        populate_by_name=True,
    )


class BrokerSettings(BaseSettings):
    """Where the broker is and how names on it are spelled."""

    model_config = settings_config("SLUICEGATE_")

    rabbitmq_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@localhost:5672/"),
        validation_alias=AliasChoices("SLUICEGATE_RABBITMQ_URL", "RABBITMQ_URL"),
        description=(
            "AMQP URL of the broker, or of each node of a cluster separated by commas (connections fail over"
            " between them); credentials inside are kept secret."
        ),
    )
    prefix: str = Field(
        default="sluicegate",
        pattern=NAME_PATTERN,
        description="Prefix of every exchange and queue name.",
    )
    partitions: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Scheduler partitions: tasks of a tenant go to partition crc32(tenant) mod N, each scheduled by its"
            " own leader. Every client and scheduler of one prefix must agree on it."
        ),
    )
    confirm_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a publish may wait for the broker's confirm."
    )
    connect_deadline: PositiveDuration = Field(
        default=timedelta(seconds=30), description="How long to keep retrying the first connection to the broker."
    )
    broker_heartbeat: PositiveDuration = Field(
        default=timedelta(seconds=5),
        description=(
            "AMQP heartbeat: a broker node that stops answering is given up after about three of them and the"
            " connection moves to the next address (an address's own `?heartbeat=` wins)."
        ),
    )

    broker_tls_ca: Path | None = Field(
        default=None, description="CA bundle the broker's certificate is verified against (amqps:// addresses)."
    )
    broker_tls_cert: Path | None = Field(default=None, description="Client certificate for the broker (optional).")
    broker_tls_key: Path | None = Field(default=None, description="Private key of broker_tls_cert.")
    trusted_publishers: str = Field(
        default="",
        max_length=1000,
        description=(
            "Comma-separated broker users whose worker-state and result messages are believed (the AMQP"
            " user_id, which the broker checks); empty: every message is believed."
        ),
    )

    @field_validator("rabbitmq_url")
    @classmethod
    def _check_urls(cls, value: SecretStr) -> SecretStr:
        return SecretStr(",".join(split_urls(value.get_secret_value())))

    @field_validator("broker_heartbeat")
    @classmethod
    def _whole_seconds(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 1 or value.total_seconds() != int(value.total_seconds()):
            raise ValueError("must be a whole number of seconds, at least 1s")
        return value

    @property
    def urls(self) -> tuple[str, ...]:
        """Every broker address, in the order given."""
        return split_urls(self.rabbitmq_url.get_secret_value())

    @property
    def url(self) -> str:
        """The first broker address, for tools that take only one."""
        return self.urls[0]

    @property
    def heartbeat_s(self) -> int:
        return int(self.broker_heartbeat.total_seconds())

    @property
    def user(self) -> str | None:
        """The broker user of the first address: what this process's messages carry as user_id."""
        return URL(self.url).user or None

    @property
    def trusted(self) -> frozenset[str]:
        return frozenset(u.strip() for u in self.trusted_publishers.split(",") if u.strip())

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for amqps:// addresses when a CA or a client certificate is set (else the default)."""
        if self.broker_tls_ca is None and self.broker_tls_cert is None:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.broker_tls_ca) if self.broker_tls_ca else None)
            if self.broker_tls_cert is not None:
                key = str(self.broker_tls_key) if self.broker_tls_key else None
                context.load_cert_chain(str(self.broker_tls_cert), key)
        except (OSError, ssl.SSLError) as err:
            raise InvalidInput(f"cannot load the broker's TLS files: {err.strerror or err}") from None
        return context


class LogSettings(BaseSettings):
    """How the process logs."""

    model_config = settings_config("SLUICEGATE_LOG_")

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, validation_alias=AliasChoices("json_format", "SLUICEGATE_LOG_JSON"))


def env_name(settings_cls: type[BaseSettings], field: str) -> str:
    """The environment variable a field is read from (a field reported by its alias is that variable)."""
    for known in settings_cls.model_fields.values():
        if (
            field.isupper()
            and isinstance(known.validation_alias, AliasChoices)
            and field in known.validation_alias.choices
        ):
            return field
    info = settings_cls.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        names = [c for c in info.validation_alias.choices if isinstance(c, str) and c.isupper()]
        if names:
            return names[0]
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    return f"{prefix}{field}".upper()


def describe_validation_error(settings_cls: type[BaseSettings], err: ValidationError) -> str:
    """One line naming each bad setting and what is wrong, never its value."""
    parts = []
    for item in err.errors(include_input=False, include_url=False):
        if not item["loc"]:  # a rule across fields: its message names them
            parts.append(str(item["msg"]).removeprefix("Value error, "))
            continue
        field = str(item["loc"][0])
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown setting {field}")
        else:
            parts.append(f"{env_name(settings_cls, field)}: {item['msg']}")
    return "invalid setting " + "; ".join(parts)


def load(settings_cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment and explicit overrides; raise InvalidInput if bad."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return settings_cls(**given)
    except ValidationError as err:
        raise InvalidInput(describe_validation_error(settings_cls, err)) from err
