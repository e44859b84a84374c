"""Helpers shared by the deployment tests (reached through the `lib` fixture in conftest.py)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "production")

# The roles the image runs (the `sluicegate` subcommands of the contract).
ROLES = ("scheduler", "dispatcher", "worker", "submit", "demo", "recorder", "migrate")

# Every environment variable Sluicegate reads, from the configuration contract. A name outside this
# set in a deployment file is a typo that the application would silently ignore.
SLUICEGATE_ENV = {
    "RABBITMQ_URL",
    "SLUICEGATE_RABBITMQ_URL",
    "SLUICEGATE_PREFIX",
    "SLUICEGATE_PARTITIONS",
    "SLUICEGATE_SCHEDULER_PARTITION",
    "SLUICEGATE_LOG_LEVEL",
    "SLUICEGATE_LOG_JSON",
    "SLUICEGATE_METRICS_PORT",
    "SLUICEGATE_DISPATCHER_LISTEN",
    "SLUICEGATE_DISPATCHER_ID",
    "SLUICEGATE_DISPATCHER_DRAIN_GRACE",
    "SLUICEGATE_DISPATCHER_SEND_LOCK_TIMEOUT",
    "SLUICEGATE_WORKER_DISPATCHERS",
    "SLUICEGATE_WORKER_SLOTS",
    "SLUICEGATE_SCHEDULER_MAX_DISPATCH_ATTEMPTS",
    "SLUICEGATE_STORE_URL",
    "SLUICEGATE_RECORDER_RETENTION",
    "SLUICEGATE_TRUSTED_PUBLISHERS",
    "SLUICEGATE_BROKER_TLS_CA",
    "SLUICEGATE_DISPATCHER_INSECURE",
    "SLUICEGATE_DISPATCHER_TLS_CERT",
    "SLUICEGATE_DISPATCHER_TLS_KEY",
    "SLUICEGATE_DISPATCHER_TLS_CLIENT_CA",
    "SLUICEGATE_DISPATCHER_AUTH_KEYS",
    "SLUICEGATE_WORKER_TOKEN_FILE",
    "SLUICEGATE_WORKER_TLS_CA",
    "SLUICEGATE_WORKER_TLS_SERVER_NAME",
}
# The broker user each role connects as (deploy/rabbitmq/definitions.json), and the users whose
# state and result messages are believed.
ROLE_BROKER_USERS = {
    "scheduler": "sluicegate-scheduler",
    "scheduler-p1": "sluicegate-scheduler",  # scheduler partition 1: the same broker user
    "dispatcher": "sluicegate-dispatcher",
    "recorder": "sluicegate-recorder",
    "migrate": "sluicegate-recorder",
    "submit": "sluicegate-client",
    "demo": "sluicegate-client",
}
TRUSTED_PUBLISHERS = {"sluicegate-dispatcher", "sluicegate-scheduler"}
DEFINITIONS = REPO_ROOT / "deploy" / "rabbitmq" / "definitions.json"
BROKER_URL_ENV = {"RABBITMQ_URL", "SLUICEGATE_RABBITMQ_URL"}
STORE_URL_ENV = {"SLUICEGATE_STORE_URL"}
OTEL_ENV = {
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_RESOURCE_ATTRIBUTES",
}


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration written like 250ms, 20s, 1m or 2h (compose and Sluicegate style)."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise ValueError(f"not a simple duration: {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


# --------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text.split("CMD", 1)[1] if "CMD" in text else ""
        text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        assert all(isinstance(v, str) for v in value)
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    buffer = ""
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    assert not buffer, "Dockerfile ends inside a continued line"
    return instructions


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """Build stages, with ARG defaults declared before the first FROM substituted in FROM lines."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in dockerfile_instructions(path):
        if instruction.keyword == "ARG" and not stages:
            name, _, default = instruction.args.partition("=")
            global_args[name.strip()] = default.strip()
        elif instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            stage_name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=stage_name))
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return stages


def stage_env(stage: Stage, inherited: dict[str, str]) -> dict[str, str]:
    """The environment a stage's ENV instructions produce on top of `inherited`."""
    env = dict(inherited)
    for instruction in stage.all("ENV"):
        for token in shlex.split(instruction.args):
            name, sep, value = token.partition("=")
            assert sep, f"line {instruction.line}: use ENV NAME=value, not the legacy form"
            env[name] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)
    return env


def copy_sources(stage: Stage) -> list[str]:
    """Build-context paths a stage COPYs (not those copied from another stage)."""
    sources: list[str] = []
    for instruction in stage.all("COPY"):
        words = shlex.split(instruction.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


# --------------------------------------------------------------------------------------------
# .dockerignore, with Docker's rules: patterns in order, the last match wins, "!" re-includes,
# "**" spans directories, and a pattern matching a directory matches everything below it.


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif char == "*":
            out += "[^/]*"
            i += 1
        elif char == "?":
            out += "[^/]"
            i += 1
        elif char == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(char)
            i += 1
    return re.compile(f"^{out}$")


def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def is_ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def build_context_files(root: Path = REPO_ROOT, dockerignore: Path = DOCKERIGNORE) -> list[str]:
    """Repository-relative paths of the files Docker would send as the build context."""
    rules = dockerignore_rules(dockerignore)
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            relative = path.relative_to(root).as_posix()
            if not is_ignored(relative, rules):
                files.append(relative)
    return files


def copy_build_context(destination: Path, root: Path = REPO_ROOT) -> list[str]:
    files = build_context_files(root)
    for relative in files:
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, target)
    return files


# --------------------------------------------------------------------------------------------
# Kubernetes


def real_kustomize_command() -> list[str] | None:
    """The command that runs a real kustomize here, if any: standalone first, then kubectl's."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_with_real_kustomize(directory: Path) -> list[dict[str, Any]]:
    command = real_kustomize_command()
    assert command is not None
    result = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)} {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def object_key(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return (obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}
