"""A minimal kustomize renderer for the features deploy/k8s uses, for machines without kustomize.

The tests prefer a real `kustomize build` (or `kubectl kustomize`) when one is on PATH; this
renderer is the fallback, so the manifests can still be validated everywhere. It supports exactly
what the kustomizations here use, and refuses anything else instead of guessing:

- `resources` (files, and directories holding a kustomization),
- `namespace`,
- `images` (newName, newTag, digest),
- `replicas`,
- `patches` given by `path`, holding strategic-merge patches.

Strategic merge is only as deep as these manifests need: maps merge, lists of the built-in kinds
merge by their documented merge key when it is listed in MERGE_KEYS (otherwise the renderer
fails loudly), and lists inside custom resources are replaced whole, which is what kustomize does
for kinds it has no schema for. test_k8s_manifests.py compares this renderer's output with real
kustomize wherever both exist, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "replicas", "patches"}

# Kinds that have no namespace; kustomize leaves their metadata.namespace alone. A Namespace
# object is special: kustomize renames it to the kustomization's namespace.
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}

# API groups whose kinds kustomize knows the schema of (so it applies strategic merge to them).
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io"}

# Merge keys of built-in list fields, by field name. Only fields whose key does not depend on
# where the list sits: "ports", for one, is keyed by containerPort in a container but by port in
# a Service, so it is deliberately absent and patching it fails.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,  # no merge key: kustomize appends; refuse rather than guess
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}

# Lists of built-in kinds that have no merge key in the Kubernetes schema: kustomize replaces them whole.
REPLACED_LISTS = {"volumeClaimTemplates", "accessModes"}

SCALABLE_KINDS = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}


class UnsupportedKustomization(Exception):
    """The kustomization uses something this renderer does not implement."""


def _api_group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _is_builtin(obj: dict[str, Any]) -> bool:
    return _api_group(str(obj.get("apiVersion", ""))) in BUILTIN_GROUPS


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in a file."""
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no kustomization file in {directory}")


def render(directory: Path) -> list[dict[str, Any]]:
    """Render the kustomization in `directory` to a list of objects."""
    directory = Path(directory)
    spec = load_documents(_kustomization_file(directory))[0]
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: fields not supported here: {sorted(unknown)}")

    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(render(target))
        else:
            objects.extend(copy.deepcopy(load_documents(target)))

    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise UnsupportedKustomization(f"{directory}: only `patches: - path: FILE` is supported")
        for patch in load_documents(directory / patch_entry["path"]):
            _apply_patch(objects, patch)

    if "namespace" in spec:
        _set_namespace(objects, spec["namespace"])
    for image in spec.get("images", []):
        _set_image(objects, image)
    for replica in spec.get("replicas", []):
        _set_replicas(objects, replica)
    return objects


def _apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    kind = patch.get("kind")
    name = (patch.get("metadata") or {}).get("name")
    group = _api_group(str(patch.get("apiVersion", "")))
    matches = [
        obj
        for obj in objects
        if obj.get("kind") == kind
        and obj.get("metadata", {}).get("name") == name
        and _api_group(str(obj.get("apiVersion", ""))) == group
    ]
    if len(matches) != 1:
        raise UnsupportedKustomization(f"patch {kind}/{name} matches {len(matches)} objects, expected 1")
    target = matches[0]
    merged = _merge(target, patch, builtin=_is_builtin(target), path=f"{kind}/{name}")
    target.clear()
    target.update(merged)


def _merge(base: Any, patch: Any, *, builtin: bool, path: str, field: str = "") -> Any:
    if isinstance(patch, dict):
        if any(str(key).startswith("$") for key in patch):
            raise UnsupportedKustomization(f"{path}: patch directives ($patch, ...) are not supported")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        result = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            elif key in result:
                result[key] = _merge(result[key], value, builtin=builtin, path=f"{path}.{key}", field=key)
            else:
                result[key] = copy.deepcopy(value)
        return result
    if isinstance(patch, list):
        if not builtin or field in REPLACED_LISTS:
            return copy.deepcopy(patch)
        if field not in MERGE_KEYS or MERGE_KEYS[field] is None:
            raise UnsupportedKustomization(f"{path}: no known strategic-merge key for list field {field!r}")
        key = MERGE_KEYS[field]
        items: list[Any] = copy.deepcopy(base) if isinstance(base, list) else []
        added: list[Any] = []  # kustomize puts the items a patch adds before the ones it had
        for item in patch:
            existing = next((i for i, cur in enumerate(items) if cur.get(key) == item.get(key)), None)
            if existing is None:
                added.append(copy.deepcopy(item))
            else:
                items[existing] = _merge(items[existing], item, builtin=builtin, path=f"{path}[{item.get(key)}]")
        return added + items
    return copy.deepcopy(patch)


def _set_namespace(objects: list[dict[str, Any]], namespace: str) -> None:
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        if obj.get("kind") == "Namespace":
            meta["name"] = namespace
        elif obj.get("kind") not in CLUSTER_SCOPED_KINDS:
            meta["namespace"] = namespace


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is not mistaken for a tag."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    last_slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > last_slash:
        image, tag = image[:colon], image[colon + 1 :]
    return image, tag, digest


def _set_image(objects: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    unknown = set(spec) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise UnsupportedKustomization(f"images: fields not supported here: {sorted(unknown)}")

    def rewrite(reference: str) -> str:
        name, tag, digest = _split_image(reference)
        if name != spec["name"]:
            return reference
        name = spec.get("newName", name)
        if "digest" in spec:
            return f"{name}@{spec['digest']}"
        if "newTag" in spec:
            return f"{name}:{spec['newTag']}"
        # Only the name changes: keep whatever tag and digest the reference had.
        return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and isinstance(container.get("image"), str):
                            container["image"] = rewrite(container["image"])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for obj in objects:
        walk(obj)


def _set_replicas(objects: list[dict[str, Any]], spec: dict[str, Any]) -> None:
    found = False
    for obj in objects:
        if obj.get("kind") in SCALABLE_KINDS and obj.get("metadata", {}).get("name") == spec["name"]:
            obj.setdefault("spec", {})["replicas"] = spec["count"]
            found = True
    if not found:
        raise UnsupportedKustomization(f"replicas: no scalable object named {spec['name']!r}")
