"""The dispatcher's edge limits, token buckets and the quiet log, with time walked by hand."""

from __future__ import annotations

import logging

import pytest

from sluicegate.errors import LimitExceeded
from sluicegate.ratelimit import Buckets, QuietLog
from sluicegate.v1 import worker_pb2
from sluicegate_dispatcher.limits import Admission, EdgeLimits, check_events, check_registration
from sluicegate_dispatcher.service import Undecodable, decode, peer_host
from sluicegate_dispatcher.sessions import Sessions


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    buckets = Buckets(rate=2.0, burst=3)
    assert [buckets.take("k", 0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("k", 0.5)  # one token back after half a second
    assert not buckets.take("k", 0.5)
    assert buckets.take("other", 0.5), "keys are apart"
    assert all(Buckets(rate=0, burst=1).take("k", 0.0) for _ in range(100)), "rate 0 is no limit"


def test_the_quiet_log_speaks_once_per_interval_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    quiet = QuietLog(logging.getLogger("quiet-test"), interval=10.0)
    with caplog.at_level(logging.WARNING, logger="quiet-test"):
        for i in range(1000):
            quiet(i * 0.001, "bad body %d", i)
        quiet(11.0, "bad body %d", 1000)
    assert len(caplog.records) == 2
    assert "999 more like it" in caplog.records[1].getMessage()
    assert quiet.total == 1001


def test_a_registration_may_not_name_too_many_or_too_long_actions_or_labels() -> None:
    limits = EdgeLimits(max_actions=4, max_action_chars=20, max_labels=2, max_label_chars=10)
    check_registration(limits, ["a", "b"], {"k": "v"})
    with pytest.raises(LimitExceeded, match="at most 4 actions"):
        check_registration(limits, ["a"] * 5, {})
    with pytest.raises(LimitExceeded, match="20 characters"):
        check_registration(limits, ["a" * 11, "b" * 10], {})
    with pytest.raises(LimitExceeded, match="at most 2 labels"):
        check_registration(limits, ["a"], {"a": "", "b": "", "c": ""})
    with pytest.raises(LimitExceeded, match="10 characters"):
        check_registration(limits, ["a"], {"k": "v" * 10})
    with pytest.raises(LimitExceeded, match="at most 3 events"):
        check_events(EdgeLimits(max_events=3), 4)


def _register(sessions: Sessions, worker_id: str, principal: str, tenant: str = "t") -> None:
    sessions.register(
        worker_id=worker_id, tenant=tenant, actions=frozenset({"a"}), labels={}, slots=1, now=0.0, principal=principal
    )


def test_sessions_are_limited_per_principal_and_per_tenant_and_a_replaced_session_does_not_count() -> None:
    sessions = Sessions()
    admission = Admission(EdgeLimits(sessions_per_principal=2, sessions_per_tenant=3, register_rate=0))
    for worker in ("m1", "m2"):
        admission.register(sessions, principal="mallory", tenant="t", worker_id=worker, now=0.0)
        _register(sessions, worker, "mallory")
    with pytest.raises(LimitExceeded, match="2 sessions per principal"):
        admission.register(sessions, principal="mallory", tenant="t", worker_id="m3", now=0.0)
    admission.register(sessions, principal="mallory", tenant="t", worker_id="m1", now=0.0)  # replaces m1
    admission.register(sessions, principal="alice", tenant="t", worker_id="a1", now=0.0)
    _register(sessions, "a1", "alice")
    with pytest.raises(LimitExceeded, match="3 sessions per tenant"):
        admission.register(sessions, principal="bob", tenant="t", worker_id="b1", now=0.0)
    admission.register(sessions, principal="bob", tenant="other", worker_id="b1", now=0.0)
    assert admission.refused == 2


def test_registrations_and_heartbeats_are_rate_limited() -> None:
    admission = Admission(EdgeLimits(register_rate=1.0, register_burst=2, heartbeat_rate=1.0, heartbeat_burst=2))
    sessions = Sessions()
    admission.register(sessions, principal="p", tenant="t", worker_id="", now=0.0)
    admission.register(sessions, principal="p", tenant="t", worker_id="", now=0.0)
    with pytest.raises(LimitExceeded, match="too many registrations"):
        admission.register(sessions, principal="p", tenant="t", worker_id="", now=0.0)
    admission.register(sessions, principal="p", tenant="t", worker_id="", now=1.0)
    admission.heartbeat("s1", 0.0)
    admission.heartbeat("s1", 0.0)
    with pytest.raises(LimitExceeded, match="heartbeats too fast"):
        admission.heartbeat("s1", 0.0)


def test_by_default_a_whole_fleet_on_one_host_registers_at_once() -> None:
    """1,000 workers started together on one host (one principal) took 40 s to register, 20 a second
    past a burst of 200; the burst is now the sessions a principal may hold."""
    limits = EdgeLimits()
    admission = Admission(limits)
    sessions = Sessions()
    for k in range(limits.sessions_per_principal):
        admission.register(sessions, principal="host", tenant="t", worker_id=f"w{k}", now=0.0)
        _register(sessions, f"w{k}", "host")
    with pytest.raises(LimitExceeded):
        admission.register(sessions, principal="host", tenant="t", worker_id="one-more", now=0.0)
    assert admission.refused == 1


def test_a_session_principal_defaults_to_its_worker_id() -> None:
    sessions = Sessions()
    session, _ = sessions.register(worker_id="w1", tenant="t", actions=frozenset({"a"}), labels={}, slots=1, now=0.0)
    assert session.principal == "w1"


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\x08"])
def test_decode_turns_undecodable_bytes_into_invalid_input_naming_only_the_type(body: bytes) -> None:
    with pytest.raises(Undecodable) as caught:
        decode(worker_pb2.RegisterRequest, body)
    assert str(caught.value) == "request body does not decode as a RegisterRequest"


def test_decode_takes_a_message_as_it_is() -> None:
    request = worker_pb2.RegisterRequest(worker_id="w")
    assert decode(worker_pb2.RegisterRequest, request) is request
    assert decode(worker_pb2.RegisterRequest, request.SerializeToString()) == request


class _Peer:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize(
    ("peer", "principal"),
    [("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"), ("ipv6:[::1]:5555", "ipv6:[::1]"), ("unix:/tmp/s", "unix:/tmp/s")],
)
def test_the_default_principal_is_the_peer_host_without_its_port(peer: str, principal: str) -> None:
    assert peer_host(_Peer(peer)) == principal  # type: ignore[arg-type]
