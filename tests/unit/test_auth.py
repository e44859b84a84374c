"""Tokens, key sets that rotate, client-certificate identities and the policy (sluicegate.auth)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from cryptography import x509

from sluicegate import auth
from sluicegate.errors import InvalidInput, PermissionDenied, Unauthenticated
from tests.tlsfiles import make_ca

NOW = 1_800_000_000.0


def keyset(*kids: str) -> auth.KeySet:
    keys = auth.KeySet(keys={}, issue="")
    for kid in kids:
        keys = keys.with_new_key(kid)
    return keys


def test_a_token_names_its_principal_role_and_tenants() -> None:
    keys = keyset("k1")
    token = auth.issue(
        keys, principal="fleet-a", role="worker", tenants=["acme", "beta"], ttl=timedelta(hours=1), now=NOW
    )
    principal = auth.verify(token, keys, now=NOW + 10)
    # Until its expiry and the leeway it was verified with: a stream opened with it ends then.
    expires_at = NOW + 3600 + 5.0
    assert principal == auth.Principal(
        name="fleet-a", role="worker", tenants=frozenset({"acme", "beta"}), expires_at=expires_at
    )
    assert principal.may_act_for("acme")
    assert not principal.may_act_for("other")
    assert jwt.get_unverified_header(token)["kid"] == "k1"


def test_expired_forged_and_unknown_key_tokens_are_refused() -> None:
    keys = keyset("k1")
    token = auth.issue(keys, principal="p", role="worker", tenants=["acme"], ttl=timedelta(minutes=1), now=NOW)
    with pytest.raises(Unauthenticated, match="expired"):
        auth.verify(token, keys, now=NOW + 120)
    other = keyset("k1")  # same key id, another secret: a forgery
    with pytest.raises(Unauthenticated, match="does not verify"):
        auth.verify(auth.issue(other, principal="p", role="worker", tenants=["a"], ttl=timedelta(hours=1), now=NOW),
                    keys, now=NOW)  # fmt: skip
    with pytest.raises(Unauthenticated, match="unknown key"):
        auth.verify(auth.issue(keyset("k2"), principal="p", role="worker", tenants=["a"], ttl=timedelta(hours=1),
                               now=NOW), keys, now=NOW)  # fmt: skip
    unsigned = jwt.encode({"sub": "p", "role": "operator", "tenants": ["*"], "aud": "sluicegate", "exp": NOW + 60},
                          "", algorithm="none", headers={"kid": "k1"})  # fmt: skip
    with pytest.raises(Unauthenticated):
        auth.verify(unsigned, keys, now=NOW)
    for junk in ("", "x" * 9000, "not.a.token", "a.b"):
        with pytest.raises(Unauthenticated):
            auth.verify(junk, keys, now=NOW)


def test_claims_that_are_not_ours_are_refused_even_when_signed() -> None:
    keys = keyset("k1")
    secret = keys.keys["k1"]
    for claims in (
        {"sub": "p", "role": "king", "tenants": ["a"]},
        {"sub": "p", "role": "worker", "tenants": ["*"]},  # only operators act for every tenant
        {"sub": "p", "role": "worker", "tenants": "acme"},
        {"sub": "p", "role": "worker", "tenants": []},
        {"sub": "bad name!", "role": "worker", "tenants": ["a"]},
    ):
        token = jwt.encode({**claims, "aud": "sluicegate", "exp": NOW + 60}, secret, algorithm="HS256",
                           headers={"kid": "k1"})  # fmt: skip
        with pytest.raises(Unauthenticated, match="claims"):
            auth.verify(token, keys, now=NOW)


def test_issue_refuses_bad_claims() -> None:
    keys = keyset("k1")
    for kwargs in (
        {"principal": "p", "role": "worker", "tenants": [], "ttl": timedelta(days=1)},
        {"principal": "p", "role": "worker", "tenants": ["*"], "ttl": timedelta(days=1)},
        {"principal": "p", "role": "boss", "tenants": ["a"], "ttl": timedelta(days=1)},
        {"principal": "p", "role": "worker", "tenants": ["a"], "ttl": timedelta(0)},
        {"principal": "p", "role": "worker", "tenants": ["bad tenant"], "ttl": timedelta(days=1)},
    ):
        with pytest.raises(InvalidInput):
            auth.issue(keys, now=NOW, **kwargs)  # type: ignore[arg-type]


def test_key_file_is_read_again_when_it_changes_and_a_bad_edit_keeps_the_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    clock = [0.0]
    auth.write_keys(path, keyset("k1"))
    assert (path.stat().st_mode & 0o777) == 0o600
    keys = auth.KeyFile(path, recheck=1.0, clock=lambda: clock[0])
    old = keys.keys
    token = auth.issue(old, principal="p", role="worker", tenants=["a"], ttl=timedelta(hours=1), now=NOW)

    rotated = old.with_new_key("k2")
    auth.write_keys(path, rotated)
    os.utime(path, ns=(1, 1))  # a different stamp even within the clock's resolution
    assert keys.keys is old  # not looked at again within `recheck`
    clock[0] = 2.0
    assert set(keys.keys.keys) == {"k1", "k2"}
    assert keys.keys.issue == "k2"
    new_token = auth.issue(keys.keys, principal="p", role="worker", tenants=["a"], ttl=timedelta(hours=1), now=NOW)
    assert auth.verify(token, keys.keys, now=NOW).name == "p"  # old tokens still good while k1 is there
    assert auth.verify(new_token, keys.keys, now=NOW).name == "p"

    path.write_text("{ not json")
    clock[0] = 4.0
    assert set(keys.keys.keys) == {"k1", "k2"}  # a bad edit locks nobody out

    auth.write_keys(path, auth.KeySet(keys={"k2": rotated.keys["k2"]}, issue="k2"))  # k1 retired
    clock[0] = 6.0
    with pytest.raises(Unauthenticated, match="unknown key"):
        auth.verify(token, keys.keys, now=NOW)
    assert auth.verify(new_token, keys.keys, now=NOW).name == "p"


def test_key_set_file_errors_are_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    for text, match in (
        ("[]", "key set must be"),
        ('{"keys": {"k1": "c2hvcnQ"}}', "at least 32 bytes"),
        ('{"keys": {"bad id!": "x"}}', "key id"),
        ('{"keys": {"k1": "' + "A" * 44 + '"}, "issue": "k9"}', "issue"),
    ):
        path.write_text(text)
        with pytest.raises(InvalidInput, match=match):
            auth.KeyFile(path)
    with pytest.raises(InvalidInput, match="cannot read"):
        auth.KeyFile(tmp_path / "missing.json")


def test_bearer_metadata() -> None:
    assert auth.bearer([("x", "y"), ("authorization", "Bearer abc")]) == "abc"
    assert auth.bearer([("x", "y")]) is None
    with pytest.raises(Unauthenticated):
        auth.bearer([("authorization", "Basic abc")])


def test_a_client_certificate_names_principal_tenants_and_role(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    pem = ca.issue_client("fleet-b", tenants=["acme"]).cert_pem
    principal = auth.from_certificate(pem)
    ends = x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()
    assert principal == auth.Principal(
        name="fleet-b", role="worker", tenants=frozenset({"acme"}), via="certificate", expires_at=ends
    )
    op = ca.issue_client("ops", tenants=["*"], role="operator").cert_pem
    assert auth.from_certificate(op).role == "operator"
    with pytest.raises(Unauthenticated):
        auth.from_certificate(ca.issue_client("nobody", tenants=[]).cert_pem)
    with pytest.raises(Unauthenticated):
        auth.from_certificate(b"not a certificate")


def test_policy_roles_tenants_and_worker_ids() -> None:
    worker = auth.Principal(name="a", role="worker", tenants=frozenset({"acme"}))
    client = auth.Principal(name="c", role="client", tenants=frozenset({"acme"}))
    operator = auth.Principal(name="o", role="operator", tenants=frozenset({"*"}))
    auth.authorize(worker, "/sluicegate.v1.WorkerService/Register")
    auth.authorize(operator, "/sluicegate.v1.WorkerService/Anything")
    with pytest.raises(PermissionDenied):
        auth.authorize(client, "/sluicegate.v1.WorkerService/Register")
    with pytest.raises(PermissionDenied):
        auth.authorize(worker, "/sluicegate.v1.WorkerService/Other")
    auth.check_tenant(worker, "acme")
    auth.check_tenant(operator, "anyone")
    auth.check_tenant(None, "anyone")  # no credentials configured: no policy
    with pytest.raises(PermissionDenied, match="tenant"):
        auth.check_tenant(worker, "beta")

    owners = auth.Owners(remember=2)
    owners.claim("w1", worker)
    owners.claim("w1", worker)  # the same principal again: fine
    owners.check("w1", worker)
    impostor = auth.Principal(name="mallory", role="worker", tenants=frozenset({"acme"}))
    with pytest.raises(PermissionDenied):
        owners.claim("w1", impostor)
    with pytest.raises(PermissionDenied):
        owners.check("w1", impostor)
    owners.claim("w2", impostor)
    owners.claim("w3", impostor)  # w1 falls out of the memory (bounded)
    owners.claim("w1", impostor)


def test_token_command_prints_one_line_and_bad_input_is_exit_2(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    run = [sys.executable, "-m", "sluicegate.cli", "token"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    made = subprocess.run([*run, "new-key", "--kid", "k1", "--keys", str(keys)], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(keys.read_text())["issue"] == "k1"
    out = subprocess.run([*run, "issue", "--role", "worker", "--tenant", "acme", "--ttl", "30d", "--keys", str(keys)],
                         capture_output=True, text=True, env=env, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    principal = auth.verify(lines[0], auth.KeyFile(keys).keys, now=time.time())
    assert principal.role == "worker"
    assert principal.tenants == {"acme"}
    for bad in (
        ["issue", "--role", "king", "--tenant", "a"],
        ["issue", "--role", "worker", "--tenant", "a", "--ttl", "soon"],
        ["issue", "--role", "worker"],
        ["issue", "--role", "worker", "--tenant", "a", "--keys", str(tmp_path / "none.json")],
    ):
        extra = [] if "--keys" in bad else ["--keys", str(keys)]
        res = subprocess.run([*run, *bad, *extra], capture_output=True, text=True, env=env, check=False)
        assert res.returncode == 2, (bad, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stdout == ""
