"""`make demo`: run `sluicegate demo` against the broker at RABBITMQ_URL, or a throw-away one when none answers.

A broker that answers (even one that refuses the login) is used as it is. When none does, this
starts one and says so: a container through testcontainers when a Docker engine answers and has
(or can pull) the image `SLUICEGATE_DEMO_RABBITMQ_IMAGE` (default rabbitmq:3.13-management), else
a private rabbitmq-server node on free ports, the one the chaos suite uses (tests/chaos/broker.py),
which never touches a broker already on the machine. It is removed when the demo ends.

    python scripts/demo.py [sluicegate demo options...]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
IMAGE = os.environ.get("SLUICEGATE_DEMO_RABBITMQ_IMAGE", "rabbitmq:3.13-management")


def say(text: str) -> None:
    print(f"sluicegate demo: {text}", file=sys.stderr, flush=True)


def address(url: str) -> tuple[str, int] | None:
    """Host and port of the first broker address; None if it is malformed."""
    try:
        parsed = URL(url.split(",")[0].strip())
        return parsed.host or "localhost", parsed.port or 5672
    except (ValueError, TypeError):
        return None


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections where the first broker address points."""
    where = address(url)
    if where is None:
        return True  # malformed: let `sluicegate demo` say what is wrong with it
    host, port = where
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


def _docker() -> Any:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
    except Exception:
        return None
    return client


def _has_image(client: Any) -> bool:
    try:
        client.images.get(IMAGE)
        return True
    except Exception:
        try:
            client.images.pull(IMAGE)
            return True
        except Exception:
            return False


@contextlib.asynccontextmanager
async def throwaway_broker() -> AsyncIterator[str]:
    """A broker of our own for the demo's length: a container if Docker can run one, else a private node."""
    client = _docker()
    if client is not None and _has_image(client):
        from testcontainers.community.rabbitmq import RabbitMqContainer

        with RabbitMqContainer(IMAGE) as container:
            params = container.get_connection_params()
            say(f"started a throw-away RabbitMQ container ({IMAGE}) at {params.host}:{params.port}")
            yield f"amqp://guest:guest@{params.host}:{params.port}/"
        return
    from tests.chaos.broker import PrivateBroker, available

    if not available():
        raise SystemExit(
            "sluicegate demo: no broker answers at RABBITMQ_URL, and there is neither a Docker engine nor"
            " rabbitmq-server here to start one: start RabbitMQ, or point RABBITMQ_URL at one"
        )
    node = PrivateBroker(node=f"sg-demo-{os.getpid()}@localhost")
    say(f"starting a throw-away RabbitMQ node ({node.node}, no Docker engine here) ...")
    try:
        await node.start()
        say(f"started it at 127.0.0.1:{node.port}; it is removed when the demo ends")
        yield node.url
    finally:
        await node.close()


async def run(argv: list[str]) -> int:
    url = os.environ.get("SLUICEGATE_RABBITMQ_URL") or os.environ.get("RABBITMQ_URL") or DEFAULT_URL
    command = [sys.executable, "-m", "sluicegate", "demo", *argv]
    if answers(url):
        return await _demo(command, dict(os.environ))
    host, port = address(url) or ("localhost", 5672)
    say(f"no broker answers at {host}:{port}")
    async with throwaway_broker() as private_url:
        env = {k: v for k, v in os.environ.items() if k not in ("RABBITMQ_URL", "SLUICEGATE_RABBITMQ_URL")}
        return await _demo(command, {**env, "RABBITMQ_URL": private_url})


async def _demo(command: list[str], env: dict[str, str]) -> int:
    process = await asyncio.create_subprocess_exec(*command, env=env)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # passed on: the demo cleans up, then so do we
        loop.add_signal_handler(sig, process.send_signal, sig)
    return await process.wait()


def main() -> int:
    return asyncio.run(run(sys.argv[1:]))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
