"""A Docker engine and the base images the container tests build on, from Debian alone (no registry needed).

    python scripts/containers.py engine        # make a Docker engine answer (install docker.io and
                                               # docker-compose, start dockerd)
    python scripts/containers.py images        # engine, then the base images (built once, then reused)
    python scripts/containers.py stop-engine   # stop the engine if `engine` started it, else nothing
    python scripts/containers.py clean         # remove the base images

The base images are built from Debian's packages, so that nothing is pulled from a registry:

    sluicegate-local/bookworm:base   debootstrap --variant=minbase bookworm, the machine's Debian mirror
    sluicegate-local/python:3.11     a stand-in for python:3.11-slim (deploy/local/python)
    sluicegate-local/rabbitmq:3.10   RabbitMQ from Debian's rabbitmq-server (deploy/local/rabbitmq)
    sluicegate-local/postgres:15     PostgreSQL from Debian's postgresql-15 (deploy/local/postgres)
    sluicegate-local/prometheus:2    Prometheus from Debian's prometheus (deploy/local/prometheus)

Each carries a label with the hash of its recipe (and of its base); an image whose recipe has not
changed is reused, so only the first run on a machine pays for debootstrap and apt. Builds use the
host's network (`--network=host`): an engine started here has no NAT (`--iptables=false`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "deploy" / "local"
STATE = Path(os.environ.get("SLUICEGATE_DOCKERD_STATE", Path(tempfile.gettempdir()) / "sluicegate-dockerd"))
LABEL = "org.sluicegate.recipe"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
STANDIN = "python:3.11-slim"

# Building with BuildKit would need buildx, which Debian's docker.io lacks; the classic builder works.
BUILD_ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}


class Failure(Exception):
    """A step that cannot go on; main prints it as one line."""


@dataclass(frozen=True, slots=True)
class BaseImage:
    tag: str
    recipe: str  # directory under deploy/local
    needs_ca_bundle: bool = False


# Debian packages and the program each provides: the engine, and compose for the stack's test.
TOOLS = (("docker.io", "dockerd"), ("docker-compose", "docker-compose"))

BOOKWORM = "sluicegate-local/bookworm:base"
PYTHON = BaseImage("sluicegate-local/python:3.11", "python", needs_ca_bundle=True)
RABBITMQ = BaseImage("sluicegate-local/rabbitmq:3.10", "rabbitmq")
POSTGRES = BaseImage("sluicegate-local/postgres:15", "postgres")
PROMETHEUS = BaseImage("sluicegate-local/prometheus:2", "prometheus")
BASE_IMAGES = (PYTHON, RABBITMQ, POSTGRES, PROMETHEUS)


def log(message: str) -> None:
    print(f"containers: {message}", file=sys.stderr, flush=True)


def run(*command: str, timeout: float = 600, quiet: bool = False, env: dict[str, str] | None = None) -> str:
    """Run a command; its output is returned, and shown only when it fails (or unless quiet)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if result.returncode != 0:
        raise Failure(f"`{' '.join(command)}` exited {result.returncode}: {(result.stderr or result.stdout)[-2000:]}")
    if not quiet and result.stdout.strip():
        print(result.stdout.rstrip(), file=sys.stderr)
    return result.stdout


# The engine.


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise Failure(f"{' '.join(packages)} not installed, and installing needs root (apt-get install)")
    log(f"installing {' '.join(packages)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-q", quiet=True, env=env)
    run("apt-get", "install", "-y", "-q", "--no-install-recommends", *packages, quiet=True, env=env)


def ensure_engine() -> None:
    """Make `docker info` answer: an engine already running is used as it is, else one is started."""
    missing = [package for package, binary in TOOLS if shutil.which(binary) is None]
    if engine_answers() and not missing:
        return
    if missing:
        apt_install(*missing)
    if engine_answers():
        return
    STATE.mkdir(parents=True, exist_ok=True)
    log_path = STATE / "dockerd.log"
    log(f"starting dockerd --iptables=false --ip-masq=false (log {log_path})")
    with log_path.open("ab") as out:
        # No iptables rules and no masquerading: containers reach each other on user-defined
        # networks and the host reaches them, which is all the tests need; builds use the host's network.
        process = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-masq=false"],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (STATE / "dockerd.pid").write_text(str(process.pid))
    deadline = time.monotonic() + 60
    while not engine_answers():
        if process.poll() is not None:
            raise Failure(f"dockerd exited with {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise Failure(f"dockerd did not answer within 60 s; see {log_path}")
        time.sleep(0.5)
    log("engine ready")


def stop_engine() -> None:
    """Stop the engine `ensure_engine` started (by its recorded pid), and nothing else."""
    pid_file = STATE / "dockerd.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    pid_file.unlink()
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return  # already gone
    if not cmdline or not cmdline[0].endswith(b"dockerd"):
        return  # the pid was reused by something else
    log(f"stopping the engine started here (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)


# The base images.


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror in the machine's apt sources (deb822 or one-line format), else deb.debian.org."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file() or not path.name.endswith((".list", ".sources")):
            continue
        text = path.read_text(errors="replace")
        for match in re.finditer(r"^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            uri = match.group(1).rstrip("/")
            if uri.startswith("http") and uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def image_label(tag: str) -> str | None:
    """The recipe label of a local image, or None when there is no such image."""
    probe = subprocess.run(
        ["docker", "image", "inspect", "--format", f'{{{{ index .Config.Labels "{LABEL}" }}}}', tag],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def recipe_hash(image: BaseImage, base_hash: str) -> str:
    files = sorted(p for p in (RECIPES / image.recipe).rglob("*") if p.is_file())
    return digest(base_hash, *(f"{p.name}:{p.stat().st_mode & 0o111}".encode() + p.read_bytes() for p in files))


def ca_bundle() -> Path:
    """The machine's CA bundle: what outgoing TLS from here is verified against."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    fallback = Path("/etc/ssl/certs/ca-certificates.crt")
    if fallback.is_file():
        return fallback
    raise Failure("no CA bundle found (set SSL_CERT_FILE)")


def build_bookworm(wanted: str) -> None:
    if shutil.which("debootstrap") is None:
        apt_install("debootstrap")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="sluicegate-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log(f"debootstrap --variant=minbase {SUITE} from {mirror} (about 30 s)")
        run("debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror, quiet=True, timeout=900)
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n"
            f"deb {mirror.removesuffix('/debian')}/debian-security {SUITE}-security main\n"
        )
        # As in Debian's own container images: no service starts while a package installs, and the
        # package cache and lists are not kept.
        policy = rootfs / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / leftovers).glob("*"):
                if item.is_file():
                    item.unlink()
        log(f"importing the root file system as {BOOKWORM}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "--change", f"LABEL {LABEL}={wanted}", "-", BOOKWORM],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise Failure(f"docker import failed: {imported.stderr[-1000:]}")


def image_id(tag: str) -> str | None:
    probe = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True, check=False
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def build_base(image: BaseImage, wanted: str) -> None:
    replaced = image_id(image.tag)
    with tempfile.TemporaryDirectory(prefix=f"sluicegate-{image.recipe}-") as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(RECIPES / image.recipe, context)
        if image.needs_ca_bundle:
            # Copied at build time and never committed: it is this machine's trust, not the project's.
            shutil.copyfile(ca_bundle(), context / "ca-certificates.crt")
        log(f"building {image.tag}")
        started = time.monotonic()
        run(
            "docker", "build", "--network=host", "--quiet",
            "--build-arg", f"BASE_IMAGE={BOOKWORM}", "--label", f"{LABEL}={wanted}",
            "-t", image.tag, str(context),
            env=BUILD_ENV, quiet=True, timeout=900,
        )  # fmt: skip
        log(f"built {image.tag} in {time.monotonic() - started:.0f} s")
    if replaced is not None and replaced != image_id(image.tag):
        # The image of the old recipe, untagged now: removed unless something still uses it.
        subprocess.run(["docker", "image", "rm", replaced], capture_output=True, check=False)


def ensure_images(only: tuple[BaseImage, ...] = BASE_IMAGES) -> None:
    """Build every base image whose recipe changed (or that is missing); reuse the others."""
    ensure_engine()
    bookworm = digest(SUITE, "minbase", debian_mirror(), "v1")
    if image_label(BOOKWORM) != bookworm:
        build_bookworm(bookworm)
    for image in only:
        wanted = recipe_hash(image, bookworm)
        if image_label(image.tag) != wanted:
            build_base(image, wanted)


def clean_images() -> None:
    for tag in [*(i.tag for i in BASE_IMAGES), BOOKWORM]:
        if image_label(tag) is not None:
            run("docker", "image", "rm", tag, quiet=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["engine", "images", "stop-engine", "clean"])
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.action == "engine":
            ensure_engine()
        elif args.action == "images":
            ensure_images()
        elif args.action == "stop-engine":
            stop_engine()
        else:
            clean_images()
    except Failure as err:
        print(f"containers: {err}", file=sys.stderr)
        return 1
    log(f"{args.action}: done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
