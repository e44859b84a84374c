"""deploy/docker/healthcheck.py against a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import pytest


class _Handler(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[dict[str, int]] = {"/healthz": 200, "/readyz": 503}

    def do_GET(self) -> None:
        self.send_response(self.statuses.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(script: Path, port: int | str, *args: str) -> subprocess.CompletedProcess[str]:
    # Proxy variables must not matter: the script talks to 127.0.0.1 directly.
    env = {
        **os.environ,
        "SLUICEGATE_METRICS_PORT": str(port),
        "http_proxy": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    return subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=20, check=False
    )


@pytest.fixture
def script(lib: ModuleType) -> Path:
    return lib.REPO_ROOT / "deploy" / "docker" / "healthcheck.py"


@pytest.mark.timeout(30)
def test_healthy_when_healthz_answers_2xx(script: Path, server_port: int) -> None:
    result = _run(script, server_port)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(30)
def test_unhealthy_on_an_error_status(script: Path, server_port: int) -> None:
    result = _run(script, server_port, "/readyz")
    assert result.returncode == 1
    assert "503" in result.stderr


@pytest.mark.timeout(30)
def test_unhealthy_when_nothing_listens(script: Path) -> None:
    result = _run(script, _free_port())
    assert result.returncode == 1
    assert "failed" in result.stderr


@pytest.mark.timeout(30)
def test_unhealthy_on_a_bad_port_setting(script: Path) -> None:
    result = _run(script, "not-a-port")
    assert result.returncode == 1
    assert "SLUICEGATE_METRICS_PORT" in result.stderr
