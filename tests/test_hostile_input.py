"""Every parser that reads the network, fed whole classes of hostile payloads: each one
refuses with its own domain's error (or ``None``) and nothing else escapes — above all no
``RecursionError``, which ends the thread that parsed the message."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

from device_agent._agent import _claimed_counter
from device_agent._intake import DesiredInbox, Unverified, Verified
from edge_sdk._json import MESSAGE_MAX_BYTES, UnsafeJsonError, loads_bounded
from edge_sdk.errors import TransportError
from edge_sdk.release import DeviceStatus
from edge_sdk.transport._chunks import ChunkRequest
from edge_sdk.trust import DeploymentVerificationError, verify_deployment
from tests._hostile import FAMILIES, payloads


def _escapes(parse: Callable[[bytes], Any], allowed: type[BaseException]) -> list[str]:
    """The members of every family for which ``parse`` raised something not ``allowed``."""
    out = []
    for label, payload in payloads():
        try:
            parse(payload)
        except allowed:
            pass
        except BaseException as err:  # RecursionError included: that is the bug
            out.append(f"{label}: {type(err).__name__}: {str(err)[:80]}")
    return out


def test_hostile_payloads_only_ever_raise_unsafe_json_error_from_the_bounded_parser() -> None:
    assert _escapes(lambda p: loads_bounded(p, max_bytes=MESSAGE_MAX_BYTES, max_depth=16),
                    UnsafeJsonError) == []


@pytest.mark.parametrize("payload, says", [
    (b"[" * 5000, "nested deeper than the limit of 16 levels"),
    (b'{"a":' * 17 + b"1" + b"}" * 17, "nested deeper"),
    (b"[" * 16 + b"]" * 16 + b"x" * (MESSAGE_MAX_BYTES + 1), "over the limit of 131072"),
    (b'{"a": "\xff"}', "not UTF-8"),
    ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
    (b'{"counter": NaN}', "NaN is not a JSON value"),
    (b'{"counter": -Infinity}', "-Infinity is not a JSON value"),
    (b'{"counter": 1e999}', "out of range"),
    (b'{"counter": ' + b"9" * 5000 + b"}", "not JSON"),
    (b'{"a": 1', "not JSON"),
])
def test_each_hostile_class_is_refused_with_a_diagnosis(payload: bytes, says: str) -> None:
    with pytest.raises(UnsafeJsonError, match=says) as err:
        loads_bounded(payload, max_bytes=MESSAGE_MAX_BYTES, max_depth=16)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    doc = {"note": "[[[[{{{{" * 1000 + '\\"]' + "]]]", "n": [[1]]}
    assert loads_bounded(json.dumps(doc).encode(), max_bytes=MESSAGE_MAX_BYTES,
                         max_depth=3) == doc
    # Exactly at the limit is allowed.
    assert loads_bounded(b"[" * 16 + b"]" * 16, max_bytes=64, max_depth=16) is not None


def test_hostile_chunk_requests_are_dropped_as_transport_errors_by_the_responder() -> None:
    assert _escapes(ChunkRequest.decode, TransportError) == []
    with pytest.raises(TransportError, match="nested deeper"):
        ChunkRequest.decode(b"[" * 5000)


def test_hostile_desired_payloads_are_refused_as_deployment_errors() -> None:
    key = CryptoSigner.generate_ed25519().public_key

    def verify(p: bytes) -> None:
        verify_deployment(p, key, device_id="d", fleet="lab")

    assert _escapes(verify, DeploymentVerificationError) == []


def test_hostile_state_reports_are_ignored_by_the_operators_watch() -> None:
    def parse(p: bytes) -> None:
        status = DeviceStatus.parse("d", p)
        assert status is None or isinstance(status.deployment, int)

    assert _escapes(parse, ()) == []


def test_hostile_desired_payloads_never_break_the_agents_counter_peek() -> None:
    def peek(p: bytes) -> None:
        c = _claimed_counter(p)
        assert c is None or type(c) is int

    assert _escapes(peek, ()) == []
    assert _claimed_counter(b'{"signed": {"counter": true}}') is None
    assert _claimed_counter(b'{"signed": {"counter": 7}}') == 7


def _garbage(n: int) -> Unverified:
    return Unverified("t", f"{n:032x}", 16, None, "deployment is not JSON")


def test_unverifiable_message_never_displaces_a_pending_signed_deployment() -> None:
    inbox = DesiredInbox()
    assert inbox.offer(Verified("t", 8, b"signed #8"))
    inbox.refuse(_garbage(1))
    inbox.refuse(Unverified("t", "f" * 32, 90, 99, "not signed by the trusted key"))
    work, refused = inbox.take()
    assert [w.payload for w in work] == [b"signed #8"]
    assert [r.digest for r in refused] == [f"{1:032x}", "f" * 32]
    assert not inbox


def test_replayed_older_signed_deployment_does_not_displace_a_newer_pending_one() -> None:
    inbox = DesiredInbox()
    inbox.offer(Verified("t", 8, b"#8"))
    assert not inbox.offer(Verified("t", 5, b"#5 replayed"))
    assert inbox.offer(Verified("t", 9, b"#9"))
    inbox.offer(Verified("group", 3, b"#3 of a group"))
    work, _ = inbox.take()
    assert [w.payload for w in work] == [b"#9", b"#3 of a group"]


def test_what_waits_from_a_group_no_longer_followed_is_dropped() -> None:
    inbox = DesiredInbox()
    inbox.offer(Verified("grp/lobby", 9, b"#9 of lobby"))
    inbox.offer(Verified("grp/door", 2, b"#2 of door"))
    inbox.refuse(Unverified("grp/lobby", "e" * 32, 10, None, "not JSON"))
    inbox.forget("grp/lobby")
    work, refused = inbox.take()
    assert [w.payload for w in work] == [b"#2 of door"] and refused == []


def test_a_flood_of_garbage_is_reported_boundedly_and_leaves_signed_work_alone() -> None:
    inbox = DesiredInbox(max_refusals=4)
    inbox.offer(Verified("t", 8, b"#8"))
    for i in range(1000):
        inbox.refuse(_garbage(i))
    inbox.refuse(_garbage(999))  # a redelivery is one report, not two
    work, refused = inbox.take()
    assert [w.counter for w in work] == [8]
    assert [r.digest for r in refused] == [f"{i:032x}" for i in (996, 997, 998, 999)]
    assert inbox.dropped == 996


def test_every_family_is_exercised() -> None:
    seen = {label.rsplit(" #", 1)[0] for label, _ in payloads(per_family=1)}
    assert seen == set(FAMILIES)


@pytest.mark.parametrize("value", ["dev-1\n", "dev-1\r\n", "\ndev-1"])
def test_a_trailing_newline_never_passes_a_name_check(value: str) -> None:
    # `re.match` with `$` also matches before a final newline; every check is a fullmatch.
    from edge_sdk.errors import ConfigError
    from edge_sdk.transport._chunks import is_safe_path
    from edge_sdk.transport._config import check_topic_word

    with pytest.raises(ConfigError):
        check_topic_word(value, "device id")
    assert not is_safe_path(f"targets/m/{value}")
    assert not is_safe_path("metadata/root.json\n")
