"""The dispatcher's listening rule: beyond loopback only with TLS and credentials, or when told --insecure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sluicegate.errors import InvalidInput
from sluicegate_dispatcher import guard
from sluicegate_dispatcher.settings import DispatcherSettings


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:50051", True), ("127.8.0.1:5", True),
     ("0.0.0.0:50051", False), ("[::]:50051", False), ("10.0.0.7:50051", False), ("dispatcher:50051", False)],
)  # fmt: skip
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert guard.is_loopback(listen) is loopback


def test_beyond_loopback_needs_tls_and_credentials_or_insecure(tmp_path: Path) -> None:
    cert, key, keys = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "keys.json"
    guard.check_exposure(DispatcherSettings(listen="127.0.0.1:0"))
    for settings, missing in (
        (DispatcherSettings(listen="0.0.0.0:0"), "without TLS and credentials"),
        (DispatcherSettings(listen="0.0.0.0:0", tls_cert=cert, tls_key=key), "without credentials"),
        (DispatcherSettings(listen="0.0.0.0:0", auth_keys=keys), "without TLS:"),
    ):
        with pytest.raises(InvalidInput, match=missing):
            guard.check_exposure(settings)
    guard.check_exposure(DispatcherSettings(listen="0.0.0.0:0", tls_cert=cert, tls_key=key, auth_keys=keys))
    guard.check_exposure(DispatcherSettings(listen="0.0.0.0:0", tls_cert=cert, tls_key=key, tls_client_ca=cert))
    guard.check_exposure(DispatcherSettings(listen="0.0.0.0:0", insecure=True))


def test_tls_settings_that_do_not_go_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        DispatcherSettings(tls_cert=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="TLS_CLIENT_CA needs"):
        DispatcherSettings(tls_client_ca=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="REQUIRE_CLIENT_CERT needs"):
        DispatcherSettings(tls_require_client_cert=True)


def test_the_command_refuses_in_one_line_with_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    env["RABBITMQ_URL"] = "amqp://guest:guest@127.0.0.1:1/"  # never reached: the refusal comes first
    res = subprocess.run(
        [sys.executable, "-m", "sluicegate.cli", "dispatcher", "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "refusing to listen on 0.0.0.0:0 without TLS and credentials" in lines[0]
    assert "--insecure" in lines[0]
