"""The image's build and entry points, reproduced without Docker.

The builder stage builds a wheel from the build context (what .dockerignore lets through) and
installs it with its dependencies into a fresh virtual environment; the runtime stage runs that
environment's `sluicegate` with the image's ENV. This module does the same in a temporary
directory and runs every role's --help, so a missing file in the context, a dependency the wheel
forgot, or a broken console script fails here rather than in a container build.

It needs a package index for the dependencies (as `docker build` does) and takes about a minute.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PACKAGES = ("sluicegate", "sluicegate_dispatcher", "sluicegate_recorder", "sluicegate_scheduler")


def _run(command: list[str | Path], *, env: dict[str, str] | None = None, timeout: float = 240) -> str:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"`{shlex.join(str(p) for p in command)}` exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout + result.stderr


def _clean_env() -> dict[str, str]:
    # Nothing from the developer's environment that could make an import succeed by accident.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


class Image:
    """A stand-in for the built image: the installed venv and the runtime stage's settings."""

    def __init__(self, lib: ModuleType, root: Path) -> None:
        stages = lib.dockerfile_stages()
        builder, self.runtime = stages[0], stages[-1]
        run = " ".join(i.args for i in builder.all("RUN"))
        words = shlex.split(run)
        self.image_venv = words[words.index("venv") + 1]  # the path inside the image
        self.root = root
        self.venv = root / "venv"
        self.wheel: Path | None = None
        self.lib = lib

    def build(self) -> None:
        context = self.root / "context"
        self.lib.copy_build_context(context)
        dist = self.root / "dist"
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, context], env=_clean_env())
        (self.wheel,) = dist.glob("*.whl")
        _run([sys.executable, "-m", "venv", self.venv], env=_clean_env())
        _run([self.venv / "bin" / "python", "-m", "pip", "install", "--quiet", self.wheel], env=_clean_env())
        # COPY deploy/docker/healthcheck.py into the venv, as the runtime stage does.
        for source, target in self._copies():
            destination = self.venv / Path(target).relative_to(self.image_venv)
            destination.write_bytes((self.lib.REPO_ROOT / source).read_bytes())

    def _copies(self) -> list[tuple[str, str]]:
        pairs = []
        for instruction in self.runtime.all("COPY"):
            words = shlex.split(instruction.args)
            if not any(w.startswith("--from") for w in words):
                pairs.append((words[0], words[-1]))
        return pairs

    def localize(self, value: str) -> str:
        """A path or value from the Dockerfile, with the image's venv replaced by the local one."""
        return value.replace(self.image_venv, str(self.venv))

    def env(self) -> dict[str, str]:
        base = _clean_env()
        env = self.lib.stage_env(self.runtime, base)
        return {name: self.localize(value) for name, value in env.items()}

    def entrypoint(self) -> list[str]:
        return [self.localize(part) for part in self.runtime.last("ENTRYPOINT").exec_form()]

    def default_command(self) -> list[str]:
        return self.runtime.last("CMD").exec_form()


@pytest.fixture(scope="module")
def image(lib: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Image:
    built = Image(lib, tmp_path_factory.mktemp("image"))
    built.build()
    return built


def test_wheel_holds_the_four_packages_and_nothing_else(image: Image) -> None:
    assert image.wheel is not None
    with zipfile.ZipFile(image.wheel) as wheel:
        top_level = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
        entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "sluicegate = " in wheel.read(entry_points).decode()
        migrations = [n for n in wheel.namelist() if n.startswith("sluicegate/store/migrations/")]
    assert top_level == set(PACKAGES)
    assert "sluicegate/store/migrations/0001_task_records.sql" in migrations, "migrations are package data"


def test_entrypoint_help_lists_every_role(image: Image, lib: ModuleType) -> None:
    output = _run([*image.entrypoint(), "--help"], env=image.env(), timeout=60)
    for role in lib.ROLES:
        assert role in output, f"`sluicegate --help` does not mention {role}"


def test_default_command_help(image: Image) -> None:
    _run([*image.entrypoint(), *image.default_command(), "--help"], env=image.env(), timeout=60)


@pytest.mark.parametrize(
    "role", ["scheduler", "dispatcher", "worker", "submit", "demo", "recorder", "migrate", "result", "tasks"]
)
def test_role_help(image: Image, role: str) -> None:
    output = _run([*image.entrypoint(), role, "--help"], env=image.env(), timeout=60)
    assert output.strip(), f"`sluicegate {role} --help` printed nothing"


def test_healthcheck_runs_with_the_image_interpreter(image: Image, tmp_path: Path) -> None:
    command = [image.localize(part) for part in image.runtime.last("HEALTHCHECK").exec_form()]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing serves /healthz here: the check must run and report unhealthy, not crash. It looks
    # at an empty process table, not this machine's, where a `sluicegate submit` may be running.
    env = {**image.env(), "SLUICEGATE_METRICS_PORT": str(port), "SLUICEGATE_HEALTHCHECK_PROC": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30, check=False)
    assert result.returncode == 1, result.stderr
    assert "healthcheck:" in result.stderr
