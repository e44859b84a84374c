"""Who is calling and what they may do: signed tokens, a key set that rotates, and the policy (pure).

A token is a JWT (HS256) signed with one key of a key set and naming that key in its `kid`
header. Its claims: `sub` the principal, `role` one of worker / client / operator, `tenants` the
tenants it may act for, `exp` and `iat`, `aud` "sluicegate". The key set is a JSON file
(`{"keys": {"KID": "base64url secret", ...}, "issue": "KID"}`) that a verifier reads again when it
changes: add a key, issue new tokens with it, then remove the old one; nothing restarts.

A client certificate verified by the server (mTLS) can stand in for a token: its common name is
the principal, its URI names `urn:sluicegate:tenant:NAME` its tenants and an optional
`urn:sluicegate:role:NAME` its role (worker by default).

Nothing here knows gRPC: the dispatcher's interceptor hands in the metadata and the peer's
certificate and gets a Principal or an error back.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt

from sluicegate.errors import InvalidInput, PermissionDenied, Unauthenticated
from sluicegate.validation import TENANT_PATTERN

log = logging.getLogger(__name__)

ROLES = ("worker", "client", "operator")
AUDIENCE = "sluicegate"
ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32
MAX_TOKEN_BYTES = 8 * 1024
PRINCIPAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$")
KID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TENANT_URI = "urn:sluicegate:tenant:"
ROLE_URI = "urn:sluicegate:role:"
ALL_TENANTS = "*"

# What each role may call on the dispatcher; the health service is open to anyone (probes).
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
WORKER_METHODS = frozenset({"/sluicegate.v1.WorkerService/Register", "/sluicegate.v1.WorkerService/Session"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a caller is: a name, a role and the tenants it may act for (`*`: all of them)."""

    name: str
    role: str
    tenants: frozenset[str]
    via: str = "token"  # or "certificate"
    # Unix seconds after which the credentials no longer hold (the token's expiry, with the leeway
    # it was verified with, or the certificate's end): a stream opened with them ends then.
    expires_at: float | None = None

    def may_act_for(self, tenant: str) -> bool:
        return ALL_TENANTS in self.tenants or tenant in self.tenants


# The principal of the call being served, set by the interceptor around each handler.
current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("sluicegate_principal", default=None)


# Key sets.


@dataclass(frozen=True, slots=True)
class KeySet:
    """Signing keys by id; `issue` names the one new tokens are signed with."""

    keys: Mapping[str, bytes]
    issue: str

    @staticmethod
    def parse(text: str) -> KeySet:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidInput(f"key set is not valid JSON ({err.msg} at position {err.pos})") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), dict) or not data["keys"]:
            raise InvalidInput('key set must be {"keys": {"KID": "base64url secret", ...}, "issue": "KID"}')
        keys: dict[str, bytes] = {}
        for kid, encoded in data["keys"].items():
            if not KID.fullmatch(kid):
                raise InvalidInput("a key id must hold 1 to 64 letters, digits or _ . -")
            if not isinstance(encoded, str):
                raise InvalidInput(f"key {kid!r} must be a base64url string")
            try:
                secret = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                raise InvalidInput(f"key {kid!r} is not valid base64url") from None
            if len(secret) < MIN_SECRET_BYTES:
                raise InvalidInput(f"key {kid!r} must hold at least {MIN_SECRET_BYTES} bytes")
            keys[kid] = secret
        issue = data.get("issue", next(iter(keys)))
        if issue not in keys:
            raise InvalidInput("the key set's `issue` must name one of its keys")
        return KeySet(keys=keys, issue=issue)

    def to_json(self) -> str:
        keys = {kid: base64.urlsafe_b64encode(secret).decode().rstrip("=") for kid, secret in self.keys.items()}
        return json.dumps({"keys": keys, "issue": self.issue}, indent=2) + "\n"

    def with_new_key(self, kid: str) -> KeySet:
        """This set plus a fresh random key `kid`, which new tokens are then signed with."""
        if not KID.fullmatch(kid):
            raise InvalidInput("a key id must hold 1 to 64 letters, digits or _ . -")
        return KeySet(keys={**self.keys, kid: secrets.token_bytes(MIN_SECRET_BYTES)}, issue=kid)


class KeyFile:
    """A key set read from a file, read again when the file changes (looked at most every `recheck` s).

    A change that does not parse keeps the keys in use and is logged once: a bad edit never
    locks every worker out.
    """

    def __init__(self, path: Path, *, recheck: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.recheck = recheck
        self.clock = clock
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._keys = self._read()

    def _read(self) -> KeySet:
        try:
            stat = self.path.stat()
            text = self.path.read_text()
        except OSError as err:
            raise InvalidInput(f"cannot read the key set file {self.path.name!r}: {err.strerror}") from None
        keys = KeySet.parse(text)
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return keys

    @property
    def keys(self) -> KeySet:
        now = self.clock()
        if now - self._checked >= self.recheck:
            self._checked = now
            try:
                stat = self.path.stat()
                if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                    self._keys = self._read()
                    log.info("key set reloaded: %d key(s)", len(self._keys.keys))
            except (OSError, InvalidInput) as err:
                if self._stamp is not None:  # warn once per bad version of the file
                    log.warning("key set file changed but cannot be used (%s); keeping the keys in use", err)
                self._stamp = None
        return self._keys


def write_keys(path: Path, keys: KeySet) -> None:
    """Write a key set readable by its owner only, replacing the file in one step."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(keys.to_json())
    os.replace(tmp, path)


# Tokens.


def check_claims(principal: str, role: str, tenants: Iterable[str]) -> frozenset[str]:
    if not PRINCIPAL.fullmatch(principal):
        raise InvalidInput("a principal must hold 1 to 128 letters, digits or _ . : @ / -")
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    names = frozenset(tenants)
    for tenant in names:
        if tenant != ALL_TENANTS and not TENANT_PATTERN.fullmatch(tenant):
            raise InvalidInput("a tenant must hold 1 to 64 letters, digits or _ . - (or be * for all)")
    if not names:
        raise InvalidInput("a token names at least one tenant (or * for all)")
    if ALL_TENANTS in names and role != "operator":
        raise InvalidInput("only an operator may act for every tenant (*)")
    return names


def issue(keys: KeySet, *, principal: str, role: str, tenants: Iterable[str], ttl: timedelta, now: float) -> str:
    """A signed token with the issuing key of `keys`; `now` in seconds since the epoch."""
    names = check_claims(principal, role, tenants)
    if not timedelta(seconds=1) <= ttl <= timedelta(days=3650):
        raise InvalidInput("a token's lifetime must be between 1s and 3650d")
    claims = {
        "sub": principal,
        "role": role,
        "tenants": sorted(names),
        "aud": AUDIENCE,
        "iat": int(now),
        "exp": int(now + ttl.total_seconds()),
    }
    return jwt.encode(claims, keys.keys[keys.issue], algorithm=ALGORITHM, headers={"kid": keys.issue})


def verify(token: str, keys: KeySet, *, now: float, leeway: float = 5.0) -> Principal:
    """The principal a token names, if it is signed by a key of `keys` and not expired."""
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("a token is required")
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        raise Unauthenticated("the token is malformed") from None
    if not isinstance(kid, str) or kid not in keys.keys:
        raise Unauthenticated("the token is signed with an unknown key")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            keys.keys[kid],
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            leeway=leeway,
            options={"require": ["exp", "sub", "aud"], "verify_iat": False},
        )
        if claims["exp"] + leeway < now:  # PyJWT reads the wall clock; this is the clock we are given
            raise jwt.ExpiredSignatureError
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("the token has expired") from None
    except jwt.PyJWTError:
        raise Unauthenticated("the token does not verify") from None
    tenants = claims.get("tenants")
    try:
        if not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants):
            raise InvalidInput("tenants")
        names = check_claims(str(claims["sub"]), str(claims.get("role")), tenants)
    except InvalidInput:
        raise Unauthenticated("the token's claims are malformed") from None
    return Principal(
        name=str(claims["sub"]), role=str(claims["role"]), tenants=names, via="token",
        expires_at=float(claims["exp"]) + leeway,
    )  # fmt: skip


def bearer(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The token of an `authorization: Bearer ...` entry, if there is one."""
    for key, value in metadata:
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("authorization must be `Bearer <token>`")
    return None


def from_certificate(pem: bytes) -> Principal:
    """The principal a verified client certificate names (common name, tenant and role URIs)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        try:
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier
            )
        except x509.ExtensionNotFound:
            uris = []
    except ValueError:
        raise Unauthenticated("the client certificate cannot be read") from None
    if not names:
        raise Unauthenticated("the client certificate has no common name")
    tenants = [u.removeprefix(TENANT_URI) for u in uris if u.startswith(TENANT_URI)]
    roles = [u.removeprefix(ROLE_URI) for u in uris if u.startswith(ROLE_URI)]
    try:
        name = str(names[0].value)
        role = roles[0] if roles else "worker"
        tenants_claimed = check_claims(name, role, tenants)
        ends = cert.not_valid_after_utc.timestamp()
        return Principal(name=name, role=role, tenants=tenants_claimed, via="certificate", expires_at=ends)
    except InvalidInput:
        raise Unauthenticated("the client certificate does not name a valid principal, role and tenants") from None


# Policy.


def authorize(principal: Principal, method: str) -> None:
    """May `principal` call `method` (a full gRPC method name) at all?"""
    if principal.role == "operator":
        return
    if principal.role == "worker" and method in WORKER_METHODS:
        return
    raise PermissionDenied(f"role {principal.role} may not call {method.rsplit('/', 1)[-1]}")


def check_tenant(principal: Principal | None, tenant: str) -> None:
    if principal is not None and not principal.may_act_for(tenant):
        raise PermissionDenied(f"principal {principal.name} may not act for tenant {tenant!r}")


class Owners:
    """Which principal registered each worker id: only it may register that id again or stream for it.

    Remembered after the worker's session ends (the newest `remember` ids), so that an id does not
    become anyone's the moment its worker drops.
    """

    def __init__(self, remember: int = 100_000) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._remember = remember

    def claim(self, worker_id: str, principal: Principal | None) -> None:
        if principal is None:
            return
        owner = self._owners.get(worker_id)
        if owner is not None and owner != principal.name:
            raise PermissionDenied(f"worker id {worker_id} belongs to another principal")
        self._owners[worker_id] = principal.name
        self._owners.move_to_end(worker_id)
        while len(self._owners) > self._remember:
            self._owners.popitem(last=False)

    def check(self, worker_id: str, principal: Principal | None) -> None:
        """A stream for `worker_id` must come from the principal that registered it."""
        if principal is not None and self._owners.get(worker_id) != principal.name:
            raise PermissionDenied(f"worker id {worker_id} belongs to another principal")
