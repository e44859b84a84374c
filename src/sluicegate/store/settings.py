"""Where the task store is: SLUICEGATE_STORE_URL, a postgresql:// URL kept secret."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings

from sluicegate.durations import PositiveDuration
from sluicegate.settings import settings_config

SCHEMES = ("postgresql://", "postgres://")


class StoreSettings(BaseSettings):
    """The PostgreSQL database that holds task records; unset means no store (no lookups)."""

    model_config = settings_config("SLUICEGATE_STORE_")

    url: SecretStr | None = Field(
        default=None, description="postgresql:// URL of the task store; credentials inside it are kept secret."
    )
    connect_timeout: PositiveDuration = Field(
        default=timedelta(seconds=5), description="How long one connection attempt may take."
    )
    connect_deadline: PositiveDuration = Field(
        default=timedelta(seconds=30), description="How long the recorder and migrate retry the first connection."
    )

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        url = value.get_secret_value()
        if not url.startswith(SCHEMES):
            raise ValueError("expected a postgresql:// URL")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        except ValueError as err:
            raise ValueError("expected a postgresql:// URL with a numeric port") from err
        return value

    @property
    def configured(self) -> bool:
        return self.url is not None

    @property
    def dsn(self) -> str:
        if self.url is None:
            raise ValueError("no task store is configured")
        return self.url.get_secret_value()
