"""Unit tests of typed settings: defaults, env vars, overrides, and one-line errors that never echo values."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from sluicegate.errors import InvalidInput
from sluicegate.settings import BrokerSettings, LogSettings, env_name, load
from sluicegate_dispatcher.settings import DispatcherSettings
from sluicegate_scheduler.settings import SchedulerSettings

pytestmark = pytest.mark.timeout(5)

SECRET_URL = "amqp://u:s3cr3t@h/"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from an environment without any Sluicegate or broker setting."""
    for name in list(os.environ):
        if name.upper().startswith("SLUICEGATE_") or name.upper() == "RABBITMQ_URL":
            monkeypatch.delenv(name)


def invalid(settings_cls: type, **overrides: object) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        load(settings_cls, **overrides)
    return info.value


def assert_one_line(message: str) -> None:
    assert message
    assert "\n" not in message
    assert "\r" not in message


# Dispatcher.


def test_dispatcher_defaults() -> None:
    s = load(DispatcherSettings)
    assert s.send_lock_timeout == timedelta(milliseconds=250)
    assert s.send_lock_permits == 1
    assert s.inbox_expires >= 2 * s.inbox_ttl
    assert s.id  # made up from the host name
    assert s.id == s.id.lower()


def test_dispatcher_ids_differ_per_instance() -> None:
    assert load(DispatcherSettings).id != load(DispatcherSettings).id


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("1s", timedelta(seconds=1)),
        ("1.5m", timedelta(seconds=90)),
        (0.1, timedelta(milliseconds=100)),
        (timedelta(milliseconds=30), timedelta(milliseconds=30)),
    ],
)
def test_send_lock_timeout_override(value: object, expected: timedelta) -> None:
    assert load(DispatcherSettings, send_lock_timeout=value).send_lock_timeout == expected


def test_none_override_means_not_given() -> None:
    assert load(DispatcherSettings, send_lock_timeout=None).send_lock_timeout == timedelta(milliseconds=250)


def test_send_lock_timeout_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT", "1s")
    assert load(DispatcherSettings).send_lock_timeout == timedelta(seconds=1)


def test_override_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT", "1s")
    assert load(DispatcherSettings, send_lock_timeout="40ms").send_lock_timeout == timedelta(milliseconds=40)


def test_other_dispatcher_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_ID", "disp-7")
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_PREFETCH", "17")
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_SEND_LOCK_PERMITS", "2")
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_HEARTBEAT_TIMEOUT", "9s")
    s = load(DispatcherSettings)
    assert s.id == "disp-7"
    assert s.prefetch == 17
    assert s.send_lock_permits == 2
    assert s.heartbeat_timeout == timedelta(seconds=9)


@pytest.mark.parametrize("bad", ["forever-and-a-day", "-5ms", "0s", "0", "12 parsecs"])
def test_invalid_env_duration_names_the_variable_not_the_value(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT", bad)
    err = invalid(DispatcherSettings)
    message = str(err)
    assert_one_line(message)
    assert "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT" in message
    assert bad not in message
    # The chained ValidationError is what a traceback would print: it must not echo the value either.
    assert err.__cause__ is not None
    assert bad not in str(err.__cause__)


def test_invalid_override_names_the_variable_not_the_value() -> None:
    message = str(invalid(DispatcherSettings, send_lock_timeout="zebra-ms"))
    assert_one_line(message)
    assert "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT" in message
    assert "zebra" not in message


def test_several_invalid_settings_are_named_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT", "whenever")
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_PREFETCH", "lots")
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_ID", "Not A Valid Id")
    message = str(invalid(DispatcherSettings))
    assert_one_line(message)
    for name in (
        "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT",
        "SLUICEGATE_DISPATCHER_PREFETCH",
        "SLUICEGATE_DISPATCHER_ID",
    ):
        assert name in message
    for value in ("whenever", "lots", "Not A Valid Id"):
        assert value not in message


@pytest.mark.parametrize("permits", [0, 65])
def test_send_lock_permits_range(permits: int) -> None:
    assert "SLUICEGATE_DISPATCHER_SEND_LOCK_PERMITS" in str(invalid(DispatcherSettings, send_lock_permits=permits))


def test_unknown_override_is_rejected() -> None:
    message = str(invalid(DispatcherSettings, send_lock_timout="1s"))
    assert_one_line(message)
    assert "send_lock_timout" in message


def test_inbox_must_outlive_its_messages() -> None:
    err = invalid(DispatcherSettings, inbox_ttl="30s", inbox_expires="59s")
    assert_one_line(str(err))
    assert "INBOX_EXPIRES" in str(err).upper()
    ok = load(DispatcherSettings, inbox_ttl="30s", inbox_expires="60s")
    assert ok.inbox_expires == timedelta(seconds=60)


def test_inbox_rule_applies_to_env_values_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_INBOX_TTL", "10m")  # the default expiry is 10m
    invalid(DispatcherSettings)


def test_inbox_rule_names_a_real_variable() -> None:
    message = str(invalid(DispatcherSettings, inbox_ttl="30s", inbox_expires="40s"))
    assert "?" not in message
    assert "SLUICEGATE_DISPATCHER_INBOX_EXPIRES" in message


def test_out_of_range_env_duration_is_invalid_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT", "99999999999h")
    message = str(invalid(DispatcherSettings))
    assert_one_line(message)
    assert "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT" in message
    assert "99999999999" not in message


# Broker: secrets never shown.


def test_rabbitmq_url_from_env_is_kept_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", SECRET_URL)
    s = load(BrokerSettings)
    assert s.rabbitmq_url.get_secret_value() == SECRET_URL
    assert "s3cr3t" not in repr(s)
    assert "s3cr3t" not in str(s)
    assert "s3cr3t" not in str(s.model_dump())


def test_prefixed_rabbitmq_url_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_RABBITMQ_URL", SECRET_URL)
    assert load(BrokerSettings).rabbitmq_url.get_secret_value() == SECRET_URL


def test_rabbitmq_url_override() -> None:
    assert load(BrokerSettings, rabbitmq_url=SECRET_URL).rabbitmq_url.get_secret_value() == SECRET_URL


def test_broker_defaults() -> None:
    s = load(BrokerSettings)
    assert s.prefix == "sluicegate"
    assert s.rabbitmq_url.get_secret_value().startswith("amqp://")


def test_prefixed_rabbitmq_url_wins_over_the_generic_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://generic/")
    monkeypatch.setenv("SLUICEGATE_RABBITMQ_URL", "amqp://specific/")
    assert load(BrokerSettings).rabbitmq_url.get_secret_value() == "amqp://specific/"


@pytest.mark.parametrize("bad_prefix", ["Bad Prefix!", "UPPER", "-dash", ""])
def test_invalid_broker_setting_never_shows_the_password(monkeypatch: pytest.MonkeyPatch, bad_prefix: str) -> None:
    monkeypatch.setenv("RABBITMQ_URL", SECRET_URL)
    monkeypatch.setenv("SLUICEGATE_PREFIX", bad_prefix)
    err = invalid(BrokerSettings)
    message = str(err)
    assert_one_line(message)
    assert "SLUICEGATE_PREFIX" in message
    assert "s3cr3t" not in message
    assert "s3cr3t" not in str(err.__cause__)
    assert "s3cr3t" not in repr(err.__cause__)


def test_invalid_confirm_timeout_with_secret_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_RABBITMQ_URL", SECRET_URL)
    monkeypatch.setenv("SLUICEGATE_CONFIRM_TIMEOUT_S", "-3")
    message = str(invalid(BrokerSettings))
    assert_one_line(message)
    assert "SLUICEGATE_CONFIRM_TIMEOUT_S" in message
    assert "s3cr3t" not in message
    assert "-3" not in message


def test_invalid_url_type_does_not_echo_it() -> None:
    err = invalid(BrokerSettings, rabbitmq_url=["amqp://u:s3cr3t@h/"])
    assert "s3cr3t" not in str(err)
    assert "s3cr3t" not in str(err.__cause__)
    assert "SLUICEGATE_RABBITMQ_URL" in str(err)


def test_dispatcher_error_with_secret_url_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", SECRET_URL)
    monkeypatch.setenv("SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT", "nope")
    message = str(invalid(DispatcherSettings))
    assert "s3cr3t" not in message
    assert "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT" in message


# Log and scheduler settings.


def test_log_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("SLUICEGATE_LOG_JSON", "true")
    s = load(LogSettings)
    assert s.level == "DEBUG"
    assert s.json_format is True


def test_invalid_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_LOG_LEVEL", "chatty")
    message = str(invalid(LogSettings))
    assert_one_line(message)
    assert "SLUICEGATE_LOG_LEVEL" in message
    assert "chatty" not in message


def test_scheduler_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(SchedulerSettings)
    assert s.max_dispatch_attempts == 5
    assert s.dispatcher_stale_after == timedelta(seconds=5)
    monkeypatch.setenv("SLUICEGATE_SCHEDULER_MAX_DISPATCH_ATTEMPTS", "3")
    monkeypatch.setenv("SLUICEGATE_SCHEDULER_DISPATCHER_STALE_AFTER", "1500ms")
    s = load(SchedulerSettings)
    assert s.max_dispatch_attempts == 3
    assert s.dispatcher_stale_after == timedelta(milliseconds=1500)


@pytest.mark.parametrize(
    ("var", "bad"),
    [
        ("SLUICEGATE_SCHEDULER_MAX_DISPATCH_ATTEMPTS", "0"),
        ("SLUICEGATE_SCHEDULER_MAX_DISPATCH_ATTEMPTS", "many"),
        ("SLUICEGATE_SCHEDULER_DISPATCHER_STALE_AFTER", "yesterday"),
        ("SLUICEGATE_SCHEDULER_MAX_BATCH", "1001"),
    ],
)
def test_invalid_scheduler_setting(monkeypatch: pytest.MonkeyPatch, var: str, bad: str) -> None:
    monkeypatch.setenv(var, bad)
    message = str(invalid(SchedulerSettings))
    assert_one_line(message)
    assert var in message
    if not bad.isdigit():  # digits may legitimately appear in the message as limits
        assert bad not in message


def test_env_name() -> None:
    assert env_name(DispatcherSettings, "send_lock_timeout") == "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT"
    assert env_name(SchedulerSettings, "max_batch") == "SLUICEGATE_SCHEDULER_MAX_BATCH"
    assert env_name(BrokerSettings, "rabbitmq_url") == "SLUICEGATE_RABBITMQ_URL"
    assert env_name(BrokerSettings, "prefix") == "SLUICEGATE_PREFIX"
    assert env_name(LogSettings, "json_format") == "SLUICEGATE_LOG_JSON"


def test_broker_url_property_reveals_the_secret_only_on_purpose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", SECRET_URL)
    s = load(BrokerSettings)
    assert s.url == SECRET_URL
    assert "s3cr3t" not in repr(s)


def test_broker_connect_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(BrokerSettings).connect_deadline == timedelta(seconds=30)
    monkeypatch.setenv("SLUICEGATE_CONNECT_DEADLINE", "2s")
    assert load(BrokerSettings).connect_deadline == timedelta(seconds=2)
    monkeypatch.setenv("SLUICEGATE_CONNECT_DEADLINE", "eventually")
    message = str(invalid(BrokerSettings))
    assert "SLUICEGATE_CONNECT_DEADLINE" in message
    assert "eventually" not in message


# Worker labels, from the environment or passed in.


def test_worker_labels_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from sluicegate.worker import Worker, WorkerSettings

    assert load(WorkerSettings).labels == {}
    monkeypatch.setenv("SLUICEGATE_WORKER_LABELS", "gpu=a100, zone=eu-1")
    settings = load(WorkerSettings)
    assert settings.labels == {"gpu": "a100", "zone": "eu-1"}
    # Labels given to the constructor are added, and win over the environment's.
    worker = Worker("127.0.0.1:1", labels={"zone": "us-2", "disk": "ssd"}, settings=settings)
    assert worker.labels == {"gpu": "a100", "zone": "us-2", "disk": "ssd"}


def test_worker_labels_override_replaces_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from sluicegate.worker import WorkerSettings

    monkeypatch.setenv("SLUICEGATE_WORKER_LABELS", "gpu=a100")
    assert load(WorkerSettings, labels={"zone": "eu"}).labels == {"zone": "eu"}


@pytest.mark.parametrize(("bad", "words"), [("gpu", "key=value"), ("a=1,a=2", "twice"), ("bad key=1", "label key")])
def test_bad_worker_labels_name_the_variable_in_one_line(monkeypatch: pytest.MonkeyPatch, bad: str, words: str) -> None:
    from sluicegate.worker import WorkerSettings

    monkeypatch.setenv("SLUICEGATE_WORKER_LABELS", bad)
    message = str(invalid(WorkerSettings))
    assert_one_line(message)
    assert "SLUICEGATE_WORKER_LABELS" in message
    assert words in message


def test_bad_labels_given_to_a_worker_are_refused() -> None:
    from sluicegate.worker import Worker

    with pytest.raises(InvalidInput, match="label key"):
        Worker("127.0.0.1:1", labels={"bad key": "v"})


# Broker: several addresses (the nodes of a cluster).

CLUSTER = "amqp://u:s3cr3t@n1:5672/, amqp://u:s3cr3t@n2:5672/,amqps://u:s3cr3t@n3/"


def test_several_broker_addresses_are_read_in_order_and_kept_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", CLUSTER)
    s = load(BrokerSettings)
    assert s.urls == ("amqp://u:s3cr3t@n1:5672/", "amqp://u:s3cr3t@n2:5672/", "amqps://u:s3cr3t@n3/")
    assert s.url == "amqp://u:s3cr3t@n1:5672/"
    for text in (repr(s), str(s), str(s.model_dump())):
        assert "s3cr3t" not in text


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("amqp://u:s3cr3t@n1/,,amqp://u:s3cr3t@n2/", "address 2 of 3 is empty"),
        ("amqp://u:s3cr3t@n1/,", "address 2 of 2 is empty"),
        ("amqp://u:s3cr3t@n1/,http://u:s3cr3t@n2/", "address 2 of 2 must be an amqp:// or amqps:// URL with a host"),
        ("amqp://u:s3cr3t@n1/,amqp://u:s3cr3t@n2:99999/", "address 2 of 2"),
        ("amqp://u:s3cr3t@[::1/", "the address is not a valid URL"),
        ("s3cr3t", "the address must be an amqp:// or amqps:// URL with a host"),
        ("", "the address is empty"),
    ],
)
def test_a_bad_broker_address_is_named_by_position_never_shown(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("SLUICEGATE_RABBITMQ_URL", value)
    err = invalid(BrokerSettings)
    message = str(err)
    assert_one_line(message)
    assert message.startswith("invalid setting SLUICEGATE_RABBITMQ_URL: ")
    assert says in message
    assert "s3cr3t" not in message
    assert "s3cr3t" not in str(err.__cause__)
    assert "s3cr3t" not in repr(err.__cause__)


def test_broker_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(BrokerSettings).heartbeat_s == 5
    monkeypatch.setenv("SLUICEGATE_BROKER_HEARTBEAT", "15s")
    assert load(BrokerSettings).heartbeat_s == 15
    for bad in ("500ms", "1.5s", "0s", "often"):
        monkeypatch.setenv("SLUICEGATE_BROKER_HEARTBEAT", bad)
        message = str(invalid(BrokerSettings))
        assert_one_line(message)
        assert "SLUICEGATE_BROKER_HEARTBEAT" in message
