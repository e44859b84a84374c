"""The broker settings of transport security and trust: user, trusted publishers, the TLS context."""

from __future__ import annotations

import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sluicegate import amqp
from sluicegate.errors import InvalidInput
from sluicegate.settings import BrokerSettings
from tests.tlsfiles import make_ca


def message(user_id: str | None) -> Any:
    return SimpleNamespace(user_id=user_id)


def test_user_and_trusted_publishers() -> None:
    broker = BrokerSettings(
        rabbitmq_url="amqps://sluicegate-dispatcher:pw@a:5671/,amqps://sluicegate-dispatcher:pw@b:5671/",
        trusted_publishers=" sluicegate-dispatcher, sluicegate-scheduler ,",
    )
    assert broker.user == "sluicegate-dispatcher"
    assert broker.trusted == {"sluicegate-dispatcher", "sluicegate-scheduler"}
    assert amqp.trusted(message("sluicegate-scheduler"), broker.trusted)
    assert not amqp.trusted(message("sluicegate-client"), broker.trusted)
    assert not amqp.trusted(message(None), broker.trusted)
    anyone = BrokerSettings(rabbitmq_url="amqp://localhost/")
    assert anyone.user is None
    assert amqp.trusted(message(None), anyone.trusted)  # nobody named: every message is believed


def test_tls_context_from_the_settings(tmp_path: Path) -> None:
    assert BrokerSettings().ssl_context() is None  # the default context of an amqps:// address
    ca = make_ca(tmp_path)
    client = ca.issue_client("sluicegate-client", tenants=["default"])
    context = BrokerSettings(
        broker_tls_ca=ca.cert, broker_tls_cert=client.cert, broker_tls_key=client.key
    ).ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.get_ca_certs()[0]["subject"] == ((("commonName", "sluicegate test CA"),),)
    with pytest.raises(InvalidInput, match="cannot load the broker's TLS files"):
        BrokerSettings(broker_tls_ca=tmp_path / "missing.pem").ssl_context()
