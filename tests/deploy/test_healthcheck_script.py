"""deploy/docker/healthcheck.py against a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import tempfile
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


def _fake_proc(root: Path, *processes: list[str]) -> Path:
    """A /proc with one numbered directory per process, holding its NUL-separated cmdline."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "self").mkdir(exist_ok=True)  # not a process: must be skipped
    for pid, argv in enumerate(processes, start=1):
        (root / str(pid)).mkdir()
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return root


def _run(script: Path, port: int | str, *args: str, proc: Path | None = None) -> subprocess.CompletedProcess[str]:
    # Proxy variables must not matter: the script talks to 127.0.0.1 directly. The processes it
    # looks at are a fake /proc's (by default an empty one), never this machine's.
    env = {
        **os.environ,
        "SLUICEGATE_METRICS_PORT": str(port),
        "SLUICEGATE_HEALTHCHECK_PROC": str(proc or Path(tempfile.mkdtemp())),
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


VENV_PY = "/opt/sluicegate/bin/python"
CLI = "/opt/sluicegate/bin/sluicegate"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "argv",
    [
        [VENV_PY, CLI, "submit", "echo", "{}", "--count", "5"],
        [VENV_PY, CLI, "--log-level", "INFO", "--prefix", "demo", "submit", "sleep"],
        ["/sbin/docker-init", "--", VENV_PY, CLI, "demo", "--tasks", "10"],
        ["python", "-m", "sluicegate", "submit", "echo"],
    ],
)
def test_a_one_shot_command_passes_without_a_probe(script: Path, tmp_path: Path, argv: list[str]) -> None:
    # Nothing listens on the port: only the command the container runs decides.
    proc = _fake_proc(tmp_path / "proc", argv, ["/bin/sh"])
    result = _run(script, _free_port(), proc=proc)
    assert result.returncode == 0, result.stderr
    assert "one-shot" in result.stdout


@pytest.mark.timeout(30)
@pytest.mark.parametrize("role", ["scheduler", "dispatcher", "worker", "recorder"])
def test_a_long_running_role_is_probed(script: Path, tmp_path: Path, role: str) -> None:
    proc = _fake_proc(tmp_path / "proc", ["/sbin/docker-init", "--", VENV_PY, CLI, role], [VENV_PY, CLI, role])
    result = _run(script, _free_port(), proc=proc)
    assert result.returncode == 1, "a role that serves /healthz must answer it"
    assert "failed" in result.stderr


@pytest.mark.timeout(30)
def test_a_role_beside_a_one_shot_command_is_still_probed(script: Path, tmp_path: Path) -> None:
    # `docker exec CONTAINER sluicegate submit ...` inside a dispatcher's container.
    proc = _fake_proc(tmp_path / "proc", [VENV_PY, CLI, "dispatcher"], [VENV_PY, CLI, "submit", "echo"])
    assert _run(script, _free_port(), proc=proc).returncode == 1


@pytest.mark.timeout(30)
def test_a_shell_loop_between_commands_is_probed(script: Path, tmp_path: Path, server_port: int) -> None:
    # No sluicegate process at all (a custom entry point): the check probes as it always did.
    proc = _fake_proc(tmp_path / "proc", ["/bin/sh", "-c", "while true; do sluicegate submit echo; done"])
    assert _run(script, server_port, proc=proc).returncode == 0
    assert _run(script, _free_port(), proc=proc).returncode == 1
