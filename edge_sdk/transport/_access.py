"""What each part of ``edge-sdk serve`` needs of the broker, and a check of it at start.

A broker tells little: MQTT 3.1.1 has no refusal for a PUBLISH (Mosquitto acknowledges
a denied one and drops it), and Mosquitto's ACL file grants every SUBSCRIBE and filters
on delivery. What does tell is a message to ourselves: each permission is checked on a
topic inside the one it is about, by subscribing to that exact topic and publishing
there (QoS 1, not retained); the message comes back only when the broker let us both
publish and read it. The topics are those of the pseudo-device :data:`PROBE_DEVICE`
(no device id starts with ``_``), which the example ACL lets the serve users publish
(or read) for this purpose:

- read ``dev/+/state``, ``dev/+/events``, ``dev/+/repo/req``: publish on ``_probe``'s;
- write ``dev/+/desired``, ``dev/+/repo/res``: read back ``_probe``'s;
- write ``repo/announce`` (retained): publish the current announcement (what the
  responder publishes anyway) and read it back.

A refused SUBSCRIBE (SUBACK 0x80, as EMQX, HiveMQ, AWS IoT Core or NATS answer) counts
at once. Run it before the registry and responder subscribe (they would see the probes).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import TransportError
from ._connection import MqttConnection
from ._topics import Topics

#: The pseudo-device whose topics the check uses (never a device id: those start with
#: a letter or digit).
PROBE_DEVICE = "_probe"
#: How long a probe may take to come back before its permission counts as refused.
PROBE_TIMEOUT_S = 5.0
PARTS = ("responder", "fleet")


@dataclass(frozen=True)
class Permission:
    """One thing a part of ``serve`` needs: ``action`` (read or write) on ``topic_filter``,
    checked on ``probe_topic`` (with ``payload``, retained, when given)."""

    part: str
    action: str
    topic_filter: str
    probe_topic: str
    payload: bytes | None = None

    def __str__(self) -> str:
        return f"{self.action} {self.topic_filter}"


def permissions(part: str, topics: Topics, *, announcement: bytes | None = None,
                ) -> tuple[Permission, ...]:
    """What ``part`` (``responder`` or ``fleet``) needs. ``announcement``: the responder's
    retained announce message, to check that it may publish it (None: not checked)."""
    base = topics.base
    probe = f"{base}/dev/{PROBE_DEVICE}"
    if part == "responder":
        out = [Permission(part, "read", topics.every_repo_request, f"{probe}/repo/req"),
               Permission(part, "write", f"{base}/dev/+/repo/res", f"{probe}/repo/res")]
        if announcement is not None:
            out.append(Permission(part, "write", topics.announce, topics.announce,
                                  announcement))
        return tuple(out)
    if part == "fleet":
        return (Permission(part, "read", topics.every_device("state"), f"{probe}/state"),
                Permission(part, "read", topics.every_device("events"), f"{probe}/events"),
                Permission(part, "write", f"{base}/dev/+/desired", f"{probe}/desired"))
    raise ValueError(f"unknown part {part!r} (parts: {', '.join(PARTS)})")


def refused_permissions(connection: MqttConnection, needs: Sequence[Permission], *,
                        timeout: float = PROBE_TIMEOUT_S) -> list[Permission]:
    """The permissions of ``needs`` the broker refuses: their subscription was refused,
    or their probe did not come back within ``timeout`` (all probes run at once, so it
    costs one round trip when everything is granted)."""
    nonce = f"edge-sdk access probe {secrets.token_hex(8)}".encode()
    want = {n.probe_topic: n.payload if n.payload is not None else nonce for n in needs}
    retained = {n.probe_topic for n in needs if n.payload is not None}
    got: set[str] = set()
    cond = threading.Condition()

    def on_message(topic: str, payload: bytes) -> None:
        if want.get(topic) == payload:
            with cond:
                got.add(topic)
                cond.notify_all()

    refused: set[str] = set()
    subs = []
    try:
        for topic in want:
            try:
                subs.append(connection.subscribe(topic, on_message, qos=1, timeout=timeout))
            except TransportError:
                refused.add(topic)
        for topic, payload in want.items():
            if topic not in refused:
                try:
                    connection.publish(topic, payload, qos=1, retain=topic in retained)
                except TransportError:
                    refused.add(topic)
        with cond:
            cond.wait_for(lambda: not set(want) - refused - got, timeout)
            missing = set(want) - got
    finally:
        for s in subs:
            s.cancel()
    return [n for n in needs if n.probe_topic in missing]


def describe_refusal(refused: Sequence[Permission], user: str | None) -> str:
    """What was refused, on one line, part by part."""
    parts = {n.part: [str(m) for m in refused if m.part == n.part] for n in refused}
    what = "; ".join(f"{part} part: {', '.join(items)}" for part, items in parts.items())
    return (f"the broker refuses user {user or '(anonymous)'} what it needs: {what} (a "
            f"message to itself on dev/{PROBE_DEVICE}/... did not come back)")


__all__ = ["PARTS", "PROBE_DEVICE", "PROBE_TIMEOUT_S", "Permission", "describe_refusal",
           "permissions", "refused_permissions"]
