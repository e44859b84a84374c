"""Typed settings shared by every role, and the one-line rendering of a bad setting."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluicegate.durations import PositiveDuration
from sluicegate.errors import InvalidInput

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"

S = TypeVar("S", bound=BaseSettings)


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
        description="AMQP URL of the broker; credentials inside it are kept secret.",
    )
    prefix: str = Field(
        default="sluicegate",
        pattern=NAME_PATTERN,
        description="Prefix of every exchange and queue name.",
    )
    confirm_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a publish may wait for the broker's confirm."
    )
    connect_deadline: PositiveDuration = Field(
        default=timedelta(seconds=30), description="How long to keep retrying the first connection to the broker."
    )

    @property
    def url(self) -> str:
        return self.rabbitmq_url.get_secret_value()


class LogSettings(BaseSettings):
    """How the process logs."""

    model_config = settings_config("SLUICEGATE_LOG_")

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, validation_alias=AliasChoices("json_format", "SLUICEGATE_LOG_JSON"))


def env_name(settings_cls: type[BaseSettings], field: str) -> str:
    """The environment variable a field is read from."""
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
