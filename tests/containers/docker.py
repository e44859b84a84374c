"""The docker CLI for the container tests: every container, network and tag a run creates is labelled and removed.

A run has an id (`sgct-<hex>`); every name it creates starts with it and carries the label
`org.sluicegate.test=<id>`, so `close()` can remove exactly what this run made, and nothing else,
even after a test failed half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

LABEL = "org.sluicegate.test"
# The classic builder: Debian's docker.io has no buildx, and BuildKit would want a registry for `# syntax=`.
BUILD_ENV = {"DOCKER_BUILDKIT": "0"}


class DockerError(AssertionError):
    """A docker command failed; the message holds the command and its output."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll until `predicate()` returns something truthy, and return it; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)


class Docker:
    def __init__(self) -> None:
        self.run_id = f"sgct-{uuid.uuid4().hex[:8]}"
        self.label = f"{LABEL}={self.run_id}"
        self.tags: list[str] = []  # image tags this run added, removed at close
        self.layers: list[str] = []  # image ids its builds made, the untagged builder stages among them

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
        if check and result.returncode != 0:
            raise DockerError(
                f"`docker {shlex.join(args)}` exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def name(self, suffix: str) -> str:
        return f"{self.run_id}-{suffix}"

    # Images.

    def image_exists(self, tag: str) -> bool:
        return self("image", "inspect", tag, check=False).returncode == 0

    def tag(self, source: str, target: str) -> None:
        self("tag", source, target)
        self.tags.append(target)

    def build(self, tag: str, context: str, *args: str, timeout: float = 900) -> float:
        """Build with the classic builder on the host's network; returns the seconds it took."""
        started = time.monotonic()
        self.tags.append(tag)
        out = self("build", "--network=host", "-t", tag, *args, context, timeout=timeout, env=BUILD_ENV).stdout
        # The classic builder prints " ---> ID" after every step; after " ---> Using cache" the
        # image was already there (another build's), otherwise this build made it.
        self.layers += re.findall(r"^(?<! ---> Using cache\n) ---> ([0-9a-f]{12})$", out, re.M)
        return time.monotonic() - started

    # Networks and containers.

    def network(self, suffix: str) -> str:
        name = self.name(suffix)
        self("network", "create", "--label", self.label, name)
        return name

    def start(
        self,
        suffix: str,
        image: str,
        *command: str,
        network: str | None = None,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
    ) -> str:
        """`docker run -d` a container named after the run; returns its name."""
        name = self.name(suffix)
        args = ["run", "-d", "--name", name, "--label", self.label]
        if network:
            args += ["--network", network]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        self(*args, *options, image, *command)
        return name

    def run_once(
        self,
        image: str,
        *command: str,
        network: str | None = None,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
        timeout: float = 180,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """`docker run --rm` a one-off container and wait for it."""
        args = ["run", "--rm", "--label", self.label]
        if network:
            args += ["--network", network]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        return self(*args, *options, image, *command, timeout=timeout, check=check)

    def inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self("inspect", name).stdout)
        return data[0]

    def ip(self, name: str, network: str) -> str:
        address: str = self.inspect(name)["NetworkSettings"]["Networks"][network]["IPAddress"]
        return address

    def health(self, name: str) -> str:
        """starting, healthy or unhealthy; `exited N` once it stopped; `none` without a health check."""
        state = self.inspect(name)["State"]
        if not state["Running"]:
            return f"exited {state['ExitCode']}"
        return str(state.get("Health", {}).get("Status", "none"))

    def logs(self, name: str, tail: int = 40) -> str:
        result = self("logs", "--tail", str(tail), name, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self, names: Sequence[str], timeout: float) -> dict[str, float]:
        """Until every container's health check says healthy; returns when each did, in seconds."""
        started = time.monotonic()
        healthy: dict[str, float] = {}
        while len(healthy) < len(names):
            for name in names:
                if name in healthy:
                    continue
                status = self.health(name)
                if status == "healthy":
                    healthy[name] = time.monotonic() - started
                elif status.startswith("exited") or status == "unhealthy":
                    raise AssertionError(f"{name} is {status}:\n{self.logs(name)}")
            if time.monotonic() - started > timeout:
                waiting = {n: self.health(n) for n in names if n not in healthy}
                raise AssertionError(f"not healthy within {timeout:.0f} s: {waiting}")
            time.sleep(0.5)
        return healthy

    # Clean-up.

    def remove(self, *names: str) -> None:
        if names:
            self("rm", "-f", "-v", *names, check=False, timeout=60)

    def close(self) -> None:
        """Remove every container and network of this run, then the tags it added. Never raises."""
        with contextlib.suppress(Exception):
            ids = self("ps", "-aq", "--filter", f"label={self.label}", check=False).stdout.split()
            self.remove(*ids)
        with contextlib.suppress(Exception):
            nets = self("network", "ls", "-q", "--filter", f"label={self.label}", check=False).stdout.split()
            if nets:
                self("network", "rm", *nets, check=False)
        for tag in reversed(self.tags):
            with contextlib.suppress(Exception):
                self("image", "rm", tag, check=False)
        # What the builds left untagged (the builder stage, above all), newest first, so that each
        # removal frees its parent. A tagged image (a base image) is never removed here.
        for layer in reversed(self.layers):
            with contextlib.suppress(Exception):
                tags = self("image", "inspect", "--format", "{{len .RepoTags}}", layer, check=False).stdout.strip()
                if tags == "0":
                    self("image", "rm", layer, check=False)

    def leftovers(self) -> dict[str, list[str]]:
        """What of this run is still there (should be nothing after close)."""
        return {
            "containers": self("ps", "-aq", "--filter", f"label={self.label}", check=False).stdout.split(),
            "networks": self("network", "ls", "-q", "--filter", f"label={self.label}", check=False).stdout.split(),
            "images": [t for t in self.tags if self.image_exists(t)]
            + [
                i
                for i in self.layers
                if self("image", "inspect", "--format", "{{len .RepoTags}}", i, check=False).stdout.strip() == "0"
            ],
        }
