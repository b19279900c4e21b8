#!/usr/bin/env python3
"""Write a Mosquitto password file and ACL for an edge-sdk fleet.

    python make_credentials.py OUTDIR --fleet lab --device cam-1:lobby,door --device cam-2 \
        --operator alice --operator bob

Writes OUTDIR/passwd (mosquitto's PBKDF2-SHA512 format, like ``mosquitto_passwd``),
OUTDIR/acl and OUTDIR/credentials.json (the generated passwords, mode 0600: hand
each device and each operator its own and delete the file). One user per role
and person, each with only what its role needs:

- one per device, user name = device id (topics use ``%u``): reads only its own
  ``desired`` and ``repo/res`` topics, its groups' ``desired``, the announce topic;
  writes its ``state``/``events`` and its own ``repo/req``. It cannot publish
  releases, announcements, deployments, chunk responses or another device's
  chunk requests; the responder answers a request only on the response topic
  of the device whose request topic it came in on.
- ``edge-serve``: ``edge-sdk serve`` with both parts (responder and fleet).
- ``edge-repo`` (``--responder NAME`` for more, one per responder process):
  ``serve --only responder``: reads every device's chunk requests, writes chunk
  responses and the announce topic. It cannot publish deployments.
- ``edge-fleet``: ``serve --only fleet`` (registry, rollout controller, page):
  reads every device's ``state`` and ``events``, writes (and reads back) the
  devices' ``desired`` topics.
- ``edge-operator-1``, ``edge-operator-2`` (or ``--operator NAME``, repeatable:
  one per person or script): ``deploy``, ``rollout run``, ``status``,
  ``convert --profile-on`` / ``bench --on``: writes ``desired`` topics (devices
  and groups) and profiling requests, reads reports and profiling results.

The ``pattern`` lines give every user the topics of the device named like it;
each user that is not a device is denied them (``topic deny``), so no service
or operator account can pose as a device. ``serve`` checks at start what its
part needs with a message to itself on the topics of the pseudo-device
``_probe`` (no device id starts with ``_``), and says in one line what the
broker refused.

Use with ``use_username_as_clientid true`` (as in mosquitto.conf here): the
broker then names each session after its user, so a device cannot take over
another device's session by claiming its client id. One user is then one
connection at a time: a second connection under the same user closes the
first. Hence one user per serve process and per operator, and an operator
runs one command at a time (or gets a second account).

Mosquitto started as root drops to the ``mosquitto`` user before it reads the
password and ACL files, and both are mode 0600. So when this script runs as
root and a ``mosquitto`` user exists, it gives both files to that user; else
it leaves them to the user running it (start mosquitto as that user, or chown
them yourself).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pwd
import re
import secrets
from pathlib import Path

SERVE = "edge-serve"
RESPONDER = "edge-repo"
FLEET = "edge-fleet"
OPERATORS = ("edge-operator-1", "edge-operator-2")
#: The pseudo-device whose topics ``serve`` probes its access on (never a device id).
PROBE_DEVICE = "_probe"
#: One MQTT topic level, as edge-sdk checks it: no '.', which NATS refuses in topics.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def password_hash(password: str, *, iterations: int = 101, salt: bytes | None = None) -> str:
    """A mosquitto 2.x password file hash (``$7$`` = PBKDF2-HMAC-SHA512)."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def responder_lines(base: str) -> list[str]:
    """What the responder part of ``serve`` needs."""
    probe = f"{base}/dev/{PROBE_DEVICE}"
    return [
        f"topic read {base}/dev/+/repo/req",
        f"topic write {base}/dev/+/repo/res",
        f"topic readwrite {base}/repo/announce",
        # serve checks once at start whether a shared subscription receives here.
        f"topic readwrite {base}/probe/#",
        # ... and that it receives requests and may answer (a request to itself).
        f"topic write {probe}/repo/req",
        f"topic read {probe}/repo/res",
    ]


def fleet_lines(base: str) -> list[str]:
    """What the fleet part of ``serve`` (registry, controller, page) needs."""
    probe = f"{base}/dev/{PROBE_DEVICE}"
    return [
        f"topic read {base}/dev/+/state",
        f"topic read {base}/dev/+/events",
        # Read too: the controller may read back what is retained there (and the probe).
        f"topic readwrite {base}/dev/+/desired",
        # serve checks at start that it receives reports (a report to itself).
        f"topic write {probe}/state",
        f"topic write {probe}/events",
    ]


def operator_lines(base: str) -> list[str]:
    return [
        f"topic readwrite {base}/dev/+/desired",
        f"topic readwrite {base}/grp/+/desired",
        f"topic read {base}/dev/+/state",
        f"topic read {base}/dev/+/events",
        f"topic read {base}/repo/announce",
        f"topic write {base}/dev/+/profile/req",
        f"topic read {base}/dev/+/profile/res",
        f"topic write {base}/dev/+/samples/req",
        f"topic read {base}/dev/+/samples/res",
        f"topic write {base}/dev/+/samples/get",
        f"topic read {base}/dev/+/samples/put",
    ]


def roles(responders: list[str], operators: list[str]) -> dict[str, str]:
    """Every user that is not a device → its role (``serve``, ``responder``, ``fleet``,
    ``operator``)."""
    return {SERVE: "serve", **dict.fromkeys(responders, "responder"), FLEET: "fleet",
            **dict.fromkeys(operators, "operator")}


def acl_text(fleet: str, devices: dict[str, list[str]], *,
             responders: list[str] | None = None, operators: list[str] | None = None) -> str:
    base = f"edge/{fleet}"
    lines = ["# edge-sdk ACL (generated by examples/mosquitto/make_credentials.py)"]
    what = {"serve": responder_lines(base) + fleet_lines(base),
            "responder": responder_lines(base), "fleet": fleet_lines(base),
            "operator": operator_lines(base)}
    for user, role in roles(responders or [RESPONDER], list(operators or OPERATORS)).items():
        lines.append(f"user {user}")
        # The pattern lines below would make it the device named like it.
        lines.append(f"topic deny {base}/dev/{user}/#")
        lines += what[role]
        lines.append("")
    for dev, groups in devices.items():
        lines.append(f"user {dev}")
        lines.append(f"topic read {base}/repo/announce")
        lines += [f"topic read {base}/grp/{g}/desired" for g in groups]
        lines.append("")
    # Patterns apply to every user; %u is the user name, which for devices is the device id.
    lines += [
        "# every device: its own topics only",
        f"pattern read {base}/dev/%u/desired",
        f"pattern read {base}/dev/%u/repo/res",
        f"pattern write {base}/dev/%u/repo/req",
        f"pattern write {base}/dev/%u/state",
        f"pattern write {base}/dev/%u/events",
        f"pattern read {base}/dev/%u/profile/req",
        f"pattern write {base}/dev/%u/profile/res",
        f"pattern read {base}/dev/%u/samples/req",
        f"pattern read {base}/dev/%u/samples/get",
        f"pattern write {base}/dev/%u/samples/res",
        f"pattern write {base}/dev/%u/samples/put",
        "",
    ]
    return "\n".join(lines)


def generate(outdir: Path, fleet: str, devices: dict[str, list[str]], *,
             responders: list[str] | None = None, operators: list[str] | None = None,
             ) -> dict[str, str]:
    """Write passwd, acl and credentials.json; return {user: password}."""
    responders = list(responders or [RESPONDER])
    operators = list(operators or OPERATORS)
    service = [SERVE, *responders, FLEET, *operators]
    for name in [fleet, *service, *devices, *(g for gs in devices.values() for g in gs)]:
        if not _ID.fullmatch(name):
            raise SystemExit(f"{name!r}: ids must be letters, digits, '_', '-'")
    users = [*service, *devices]
    if len(set(users)) != len(users):
        twice = sorted({u for u in users if users.count(u) > 1})
        raise SystemExit(f"{', '.join(twice)}: each user name once (a device id is its user "
                         "name, and no device may be named like a service or operator)")
    outdir.mkdir(parents=True, exist_ok=True)
    creds = {u: secrets.token_urlsafe(18) for u in users}
    (outdir / "passwd").write_text("".join(f"{u}:{password_hash(p)}\n" for u, p in creds.items()))
    (outdir / "acl").write_text(acl_text(fleet, devices, responders=responders,
                                         operators=operators))
    cpath = outdir / "credentials.json"
    fd = os.open(cpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f, indent=2)
    for name in ("passwd", "acl"):
        os.chmod(outdir / name, 0o600)
    broker = broker_user()
    if broker is not None:
        # credentials.json stays with root: it is for the operator, not the broker.
        for name in ("passwd", "acl"):
            os.chown(outdir / name, broker.pw_uid, broker.pw_gid)
    return creds


def broker_user() -> pwd.struct_passwd | None:
    """The ``mosquitto`` account when running as root (the broker reads the files as it)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--fleet", default="default")
    ap.add_argument("--device", action="append", default=[], metavar="ID[:GROUP,...]")
    ap.add_argument("--operator", action="append", default=[], metavar="NAME",
                    help=f"an operator account (repeatable; default: {', '.join(OPERATORS)})")
    ap.add_argument("--responder", action="append", default=[], metavar="NAME",
                    help=f"a 'serve --only responder' account, one per process "
                         f"(repeatable; default: {RESPONDER})")
    args = ap.parse_args()
    devices = {}
    for spec in args.device:
        dev, _, groups = spec.partition(":")
        devices[dev] = [g for g in groups.split(",") if g]
    creds = generate(args.outdir, args.fleet, devices, responders=args.responder,
                     operators=args.operator)
    broker = broker_user()
    owner = (f"passwd and acl owned by {broker.pw_name}" if broker is not None else
             "passwd and acl owned by you, mode 0600: mosquitto must run as you, or chown them")
    print(f"wrote {args.outdir}/passwd, acl, credentials.json (users: "
          f"{', '.join(creds)}; {owner})")


if __name__ == "__main__":
    main()
