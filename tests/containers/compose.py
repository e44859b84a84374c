"""docker-compose.yml as Debian's docker-compose 1.29 and a shared CI machine can run it, plus the local-images override.

What changes, and why (the rest of the file is used as it is):

- `name:` goes (1.29 does not know the key; the project name is passed with `-p` instead);
- healthchecks lose `start_interval` (1.29 does not know it, nor does Docker Engine 20.10);
- published ports go: on a shared machine 5672 and the others may be taken, and the test reaches
  every container at its address on the stack's network instead;
- builds use the host's network (an engine without NAT, `--iptables=false`);
- the image the stack builds gets the run's own tag, so that removing it removes nothing else.

The override (deploy/local/docker-compose.local.yml) is then applied by docker-compose itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERRIDE_FILE = ROOT / "deploy" / "local" / "docker-compose.local.yml"
PROJECT_IMAGE = "sluicegate:local"


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        data: dict[str, Any] = yaml.safe_load(fh)
    return data


def _retag(service: dict[str, Any], image: str) -> None:
    if service.get("image") == PROJECT_IMAGE:
        service["image"] = image


def render(out_dir: Path, image: str) -> tuple[list[Path], list[str]]:
    """Write both files for 1.29 into `out_dir`; returns them in `-f` order and the services to start."""
    base = _load(COMPOSE_FILE)
    override = _load(OVERRIDE_FILE)
    base.pop("name", None)
    for service in base["services"].values():
        service.pop("ports", None)
        if isinstance(service.get("healthcheck"), dict):
            service["healthcheck"].pop("start_interval", None)
        if isinstance(service.get("build"), dict):
            service["build"]["network"] = "host"
        _retag(service, image)
    for service in override["services"].values():
        _retag(service, image)

    unknown = sorted(set(override["services"]) - set(base["services"]))
    assert not unknown, f"the override names services docker-compose.yml no longer has: {unknown}"
    left_out = set(override.get("x-left-out", []))
    pulled = sorted(
        name
        for name, service in base["services"].items()
        if name not in left_out and "build" not in service and name not in override["services"]
    )
    assert not pulled, f"services that would need a registry image, with none in the override: {pulled}"

    files = [out_dir / "docker-compose.yml", out_dir / "docker-compose.local.yml"]
    for path, data in zip(files, (base, override), strict=True):
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return files, [name for name in base["services"] if name not in left_out]
