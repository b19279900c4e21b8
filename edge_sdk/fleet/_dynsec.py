"""The broker's accounts through Mosquitto's dynamic security plugin (dynsec).

:class:`DynsecAdmin` sends dynsec's JSON commands on ``$CONTROL/dynamic-security/v1`` over
an :class:`~edge_sdk.transport.MqttConnection` and waits for their answers; every change
applies at once, and disabling or deleting a client, or setting its password, closes its
open connection (measured on Mosquitto 2.0.11, loopback: gone when the call returns, ~2 ms).
writes what a broker starts with: the plugin's JSON (the service and operator accounts),
``mosquitto.conf`` and the generated passwords.

Dynsec does not substitute ``%u`` in its ACLs (checked on 2.0.11), so every device has a
role of its own with literal topics (``dev:<id>``), every group one (``grp:<g>``) and every
claim batch one (``claim:<batch>``). A role name holds a ':', which no id may contain, so
the roles of services (``svc:...``) cannot be taken by a device or group.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import logging
import os
import platform
import pwd
import secrets
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._fs import atomic_write_text
from .._json import UnsafeJsonError, loads_bounded
from ..errors import ConfigError, TransportError
from ..identity import (
    DEFAULT_CLAIM_SESSIONS,
    MAX_CLAIM_SESSIONS,
    check_batch,
    check_claim_sessions,
    claim_username,
)
from ..transport import MqttConnection, Topics
from ..transport._config import check_topic_word
from ._errors import FleetError

log = logging.getLogger("edge_sdk.fleet.dynsec")

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
#: listClients answers at most this many names at a time (user names are <= 64 chars).
LIST_PAGE = 1000
#: Far above any answer to our commands (a page of names is < 70 KiB).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_RESPONSE_DEPTH = 8

SERVE = "edge-serve"
FLEET = "edge-fleet"
RESPONDER = "edge-repo"
OPERATORS = ("edge-operator-1", "edge-operator-2")
#: The pseudo-device whose topics ``serve`` probes its access on (see transport._access).
PROBE_DEVICE = "_probe"

#: dynsec's password hash: PBKDF2-HMAC-SHA512 over a 12-byte salt; 101 iterations is what
#: mosquitto_ctrl uses. Every password here is random (>= 144 bits), not a person's.
HASH_ITERATIONS = 101

# acltypes: what "read" and "write" mean in dynsec's terms.
_READ = ("subscribePattern", "publishClientReceive")
_WRITE = ("publishClientSend",)


class BrokerAdminError(FleetError):
    """A dynsec command failed, or the plugin did not answer (the message names which)."""


def device_role(device_id: str) -> str:
    return f"dev:{device_id}"


def group_role(group: str) -> str:
    return f"grp:{group}"


def claim_role(batch: str) -> str:
    return f"claim:{batch}"


def _answer_filters(topics: Topics) -> tuple[str, str]:
    """The filters of every enrolment answer and every credential answer (what the
    controller writes; Topics names only the filters of what it reads)."""
    base = topics.base
    return f"{base}/enrol/+/+/res", f"{base}/dev/+/cred/res"


def _batch_answers(topics: Topics, batch: str) -> str:
    """The filter of the enrolment answers of claim batch ``batch``."""
    return f"{topics.base}/enrol/{check_batch(batch)}/+/res"


# -- role ACLs ---------------------------------------------------------------------------

#: ("read" | "write" | "readwrite" | "subscribe", topic or filter); "subscribe" only lets
#: a filter be subscribed to (what arrives through it needs a "read" of its topics).
Access = tuple[str, str]


def _acls(lines: Iterable[Access]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for access, topic in lines:
        kinds = {"read": _READ, "write": _WRITE, "readwrite": _READ + _WRITE,
                 "subscribe": _READ[:1]}[access]
        out += [{"acltype": k, "topic": topic, "priority": 0, "allow": True} for k in kinds]
    return out


def device_lines(topics: Topics, device_id: str) -> list[Access]:
    """What device ``device_id`` may do: its own topics and the announcement."""
    dev = topics.device(device_id)
    return [
        ("read", f"{dev}/desired"),
        ("read", f"{dev}/repo/res"),
        ("read", f"{dev}/profile/req"),
        ("read", topics.cred_answer(device_id)),
        ("read", topics.announce),
        ("write", f"{dev}/repo/req"),
        ("write", f"{dev}/state"),
        ("write", f"{dev}/events"),
        ("write", f"{dev}/profile/res"),
        ("write", topics.cred_request(device_id)),
        # Field samples: the signed request and the host's chunk requests in, the status
        # and the bundle's chunks out.
        ("read", topics.samples_request(device_id)),
        ("read", topics.samples_get(device_id)),
        ("write", topics.samples_status(device_id)),
        ("write", topics.samples_put(device_id)),
    ]


def group_lines(topics: Topics, group: str) -> list[Access]:
    return [("read", topics.group_desired(group))]


def claim_lines(topics: Topics, batch: str) -> list[Access]:
    """A claim account: enrolment requests of its batch out, their answers in. Nothing else."""
    return [("write", topics.enrol_batch_requests(batch)),
            ("read", _batch_answers(topics, batch))]


def responder_lines(topics: Topics) -> list[Access]:
    """What the responder part of ``serve`` needs (as examples/mosquitto/make_credentials.py)."""
    base, probe = topics.base, f"{topics.base}/dev/{PROBE_DEVICE}"
    return [
        ("read", f"{base}/dev/+/repo/req"),
        ("write", f"{base}/dev/+/repo/res"),
        ("readwrite", topics.announce),
        # serve checks once at start whether a shared subscription receives here ...
        ("readwrite", f"{base}/probe/#"),
        # ... and responders split the requests by one (any share group). dynsec checks a
        # $share filter as it is written, prefix included (2.0.11).
        ("subscribe", f"$share/+/{base}/dev/+/repo/req"),
        ("subscribe", f"$share/+/{base}/probe/#"),
        # ... and that it receives requests and may answer (a request to itself).
        ("write", f"{probe}/repo/req"),
        ("read", f"{probe}/repo/res"),
    ]


def fleet_lines(topics: Topics) -> list[Access]:
    """What the fleet part of ``serve`` needs (registry, controller, page)."""
    base, probe = topics.base, f"{topics.base}/dev/{PROBE_DEVICE}"
    return [
        ("read", f"{base}/dev/+/state"),
        ("read", f"{base}/dev/+/events"),
        ("readwrite", f"{base}/dev/+/desired"),
        ("write", f"{probe}/state"),
        ("write", f"{probe}/events"),
    ]


def enroller_lines(topics: Topics) -> list[Access]:
    """What the enroller of ``serve --enrol`` needs: the enrolment and credential topics of
    every device, and dynsec's own (it manages the accounts)."""
    enrol_answers, cred_answers = _answer_filters(topics)
    return [
        ("read", topics.every_enrol_request),
        ("write", enrol_answers),
        ("read", topics.every_cred_request),
        ("write", cred_answers),
        ("readwrite", "$CONTROL/dynamic-security/#"),
    ]


def operator_lines(topics: Topics) -> list[Access]:
    base = topics.base
    return [
        ("readwrite", f"{base}/dev/+/desired"),
        ("readwrite", f"{base}/grp/+/desired"),
        ("read", f"{base}/dev/+/state"),
        ("read", f"{base}/dev/+/events"),
        ("read", topics.announce),
        ("write", f"{base}/dev/+/profile/req"),
        ("read", f"{base}/dev/+/profile/res"),
        # Field samples (edge-sdk samples request / pull): roles reversed for the bundle.
        ("write", f"{base}/dev/+/samples/req"),
        ("read", f"{base}/dev/+/samples/res"),
        ("write", f"{base}/dev/+/samples/get"),
        ("read", f"{base}/dev/+/samples/put"),
    ]


def service_roles(topics: Topics) -> dict[str, list[Access]]:
    """The roles of the service accounts: ``svc:serve`` (both parts and the enroller),
    ``svc:fleet`` (fleet part and enroller), ``svc:responder``, ``svc:operator``."""
    return {
        "svc:serve": responder_lines(topics) + fleet_lines(topics) + enroller_lines(topics),
        "svc:fleet": fleet_lines(topics) + enroller_lines(topics),
        "svc:responder": responder_lines(topics),
        "svc:operator": operator_lines(topics),
    }


def _check_device(device_id: str) -> str:
    # A topic word never starts with '_': no device is a claim account or the probe.
    return check_topic_word(device_id, "device id")


def _check_groups(groups: Iterable[str]) -> list[str]:
    return sorted({check_topic_word(g, "group") for g in groups})


# -- the admin ---------------------------------------------------------------------------


class _Waiting:
    __slots__ = ("answers", "done", "expected")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.answers: dict[int, dict[str, Any]] = {}
        self.done = threading.Event()


class DynsecAdmin:
    """Manages the broker's accounts over ``connection`` (whose user holds dynsec's admin
    ACLs: ``edge-serve`` or ``edge-fleet`` of :func:`broker_config`). The connection may
    be shared; several admins may work at once (each command carries its own correlation
    data). Every high-level call is idempotent and blocks for its round trips: never call
    one from a connection handler (the answer arrives on that very thread).

    What closes a client's open connection (it may reconnect if still allowed): a new
    password, disabling, deleting, and new groups (dynsec cannot revoke the
    subscriptions of a role it takes away)."""

    def __init__(self, connection: MqttConnection, *, fleet: str, prefix: str = "edge",
                 timeout: float = 10.0, list_page: int = LIST_PAGE) -> None:
        if list_page < 1:
            raise ConfigError(f"list_page must be >= 1, not {list_page}")
        self.connection = connection
        self.list_page = list_page
        self.topics = Topics(fleet, prefix)
        self.timeout = timeout
        self._me = secrets.token_hex(6)
        self._seq = 0
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}
        try:
            self._sub = connection.subscribe(RESPONSE_TOPIC, self._on_response, qos=1,
                                             timeout=timeout)
        except TransportError as err:
            raise BrokerAdminError(f"cannot read dynsec's answers: {err}") from err

    def close(self) -> None:
        """Stop listening for answers (the connection stays open)."""
        self._sub.cancel()

    # -- transport ------------------------------------------------------------------------

    def call(self, commands: Sequence[Mapping[str, Any]], *,
             tolerate: Collection[str] = ()) -> list[dict[str, Any]]:
        """Send ``commands`` in one message and return dynsec's answers in order. Raises
        :class:`BrokerAdminError` naming the first command that failed and dynsec's error,
        unless that error is one of ``tolerate`` (then the answer, with its ``error``, is
        returned like the others)."""
        if not commands:
            return []
        with self._lock:
            self._seq += 1
            request = f"{self._me}.{self._seq}"
            waiting = _Waiting(len(commands))
            self._waiting[request] = waiting
        body = [{**c, "correlationData": f"{request}.{i}"} for i, c in enumerate(commands)]
        try:
            try:
                self.connection.publish_wait(CONTROL_TOPIC, json.dumps({"commands": body}),
                                             qos=1, timeout=self.timeout)
            except TransportError as err:
                raise BrokerAdminError(f"dynsec {commands[0]['command']}: {err}") from err
            if not waiting.done.wait(self.timeout):
                raise BrokerAdminError(
                    f"the broker's dynamic security plugin did not answer "
                    f"{commands[0]['command']} within {self.timeout:g} s (is mosquitto "
                    "started with broker init's config, and is this account its admin?)")
        finally:
            with self._lock:
                self._waiting.pop(request, None)
        answers = [waiting.answers[i] for i in range(len(commands))]
        for cmd, ans in zip(commands, answers, strict=True):
            error = ans.get("error")
            if error is not None and str(error) not in tolerate:
                what = cmd.get("username") or cmd.get("rolename") or ""
                raise BrokerAdminError(
                    f"dynsec {cmd['command']}{' ' + str(what) if what else ''}: "
                    f"{' '.join(str(error).split())[:200]}")
        return answers

    def _on_response(self, topic: str, payload: bytes) -> None:
        # Anyone with dynsec's ACLs may publish here: parse bounded, trust nothing.
        try:
            doc = loads_bounded(payload, max_bytes=MAX_RESPONSE_BYTES,
                                max_depth=MAX_RESPONSE_DEPTH)
        except UnsafeJsonError as err:
            log.warning("dropped a malformed dynsec response: %s", err)
            return
        responses = doc.get("responses") if isinstance(doc, dict) else None
        if not isinstance(responses, list):
            return
        for ans in responses:
            corr = ans.get("correlationData") if isinstance(ans, dict) else None
            if not isinstance(corr, str):
                continue
            request, _, index = corr.rpartition(".")
            with self._lock:
                waiting = self._waiting.get(request)
                if waiting is None or not index.isdigit() or int(index) >= waiting.expected:
                    continue
                waiting.answers[int(index)] = ans
                if len(waiting.answers) == waiting.expected:
                    waiting.done.set()

    # -- reads ----------------------------------------------------------------------------

    def clients(self) -> list[str]:
        """Every client's user name (sorted; asked for a page at a time, so that no
        answer grows with the fleet)."""
        names: set[str] = set()
        offset = 0
        while True:
            ans = self.call([{"command": "listClients", "verbose": False,
                              "count": self.list_page, "offset": offset}])[0]
            data = ans.get("data")
            data = data if isinstance(data, dict) else {}
            page = data.get("clients")
            page = page if isinstance(page, list) else []
            names.update(n for n in page if isinstance(n, str))
            total = data.get("totalCount")
            offset += self.list_page
            if len(page) < self.list_page or not isinstance(total, int) or offset >= total:
                return sorted(names)

    def client(self, username: str) -> dict[str, Any] | None:
        """dynsec's record of ``username`` (``roles``, ``disabled``...), None if absent."""
        ans = self.call([{"command": "getClient", "username": username}],
                        tolerate=("Client not found",))[0]
        if ans.get("error") is not None:
            return None
        client = ans.get("data", {}).get("client")
        return client if isinstance(client, dict) else None

    @staticmethod
    def _roles(client: Mapping[str, Any]) -> set[str]:
        roles = client.get("roles") or []
        return {str(r.get("rolename")) for r in roles if isinstance(r, dict)}

    def _own(self, username: str, role: str, what: str) -> dict[str, Any] | None:
        """The client ``username`` if it exists and holds ``role``; None if absent; refuses
        a client that exists without it (a service, operator or other account)."""
        client = self.client(username)
        if client is not None and role not in self._roles(client):
            raise BrokerAdminError(
                f"{what} {username!r} names a broker account that is not a {what} "
                "(a service, operator or claim account): refused")
        return client

    # -- devices --------------------------------------------------------------------------

    @staticmethod
    def _role_commands(role: str, lines: list[Access], *, current: bool = False
                       ) -> list[dict[str, Any]]:
        """Create ``role`` if missing; with ``current`` also set its ACLs to ``lines``
        (a role left by an older version gets today's). Not for group roles: a broker
        may close the connections of every client holding a role whose ACLs change."""
        acls = _acls(lines)
        cmds = [{"command": "createRole", "rolename": role, "acls": acls}]
        if current:
            cmds.append({"command": "modifyRole", "rolename": role, "acls": acls})
        return cmds

    def ensure_device(self, device_id: str, password: str, groups: Iterable[str] = ()) -> None:
        """Make device ``device_id`` an account with ``password``, enabled, in ``groups``
        (exactly those). An existing device account gets the new password (which closes
        its open connection). Refuses an id that names another kind of account."""
        _check_device(device_id)
        groups = _check_groups(groups)
        role = device_role(device_id)
        roles = [{"rolename": r, "priority": 0}
                 for r in [role, *(group_role(g) for g in groups)]]
        cmds = self._role_commands(role, device_lines(self.topics, device_id), current=True)
        for g in groups:
            cmds += self._role_commands(group_role(g), group_lines(self.topics, g))
        # Twice at most: another admin may create the client between our look and our
        # createClient; then it exists and the second pass updates it.
        for _ in range(2):
            if self._own(device_id, role, "device") is None:
                answers = self.call(
                    [*cmds, {"command": "createClient", "username": device_id,
                             "password": password, "roles": roles}],
                    tolerate=("Role already exists", "Client already exists"))
                if answers[-1].get("error") is None:
                    return
                continue
            self.call([*cmds,
                       {"command": "modifyClient", "username": device_id, "roles": roles},
                       {"command": "setClientPassword", "username": device_id,
                        "password": password},
                       {"command": "enableClient", "username": device_id}],
                      tolerate=("Role already exists",))
            return
        raise BrokerAdminError(f"device {device_id!r}: its account kept changing under us")

    def set_password(self, device_id: str, password: str) -> None:
        """Give the device a new password; closes its open connection."""
        self._device_call(device_id, [{"command": "setClientPassword",
                                       "username": device_id, "password": password}])

    def set_groups(self, device_id: str, groups: Iterable[str]) -> None:
        """Make ``groups`` the device's groups (exactly those)."""
        groups = _check_groups(groups)
        roles = [{"rolename": r, "priority": 0}
                 for r in [device_role(device_id), *(group_role(g) for g in groups)]]
        cmds = [c for g in groups
                for c in self._role_commands(group_role(g), group_lines(self.topics, g))]
        self._device_call(device_id, [
            *cmds, {"command": "modifyClient", "username": device_id, "roles": roles}],
            tolerate=("Role already exists",))

    def disable(self, device_id: str) -> None:
        """Refuse the device's connections from now on; closes its open one."""
        self._device_call(device_id, [{"command": "disableClient", "username": device_id}])

    def enable(self, device_id: str) -> None:
        self._device_call(device_id, [{"command": "enableClient", "username": device_id}])

    def delete_device(self, device_id: str) -> None:
        """Delete the device's account and role (closes its connection); absent is fine."""
        _check_device(device_id)
        role = device_role(device_id)
        cmds: list[dict[str, Any]] = []
        if self._own(device_id, role, "device") is not None:
            cmds.append({"command": "deleteClient", "username": device_id})
        cmds.append({"command": "deleteRole", "rolename": role})
        self.call(cmds, tolerate=("Role not found", "Client not found"))

    def _device_call(self, device_id: str, cmds: list[dict[str, Any]], *,
                     tolerate: Collection[str] = ()) -> None:
        _check_device(device_id)
        if self._own(device_id, device_role(device_id), "device") is None:
            raise BrokerAdminError(f"device {device_id!r} has no broker account")
        self.call(cmds, tolerate=tolerate)

    # -- claims ---------------------------------------------------------------------------

    def _claim_accounts(self, batch: str) -> dict[int, dict[str, Any]]:
        """The session accounts of the claim of ``batch`` at the broker, by session
        number: every possible name looked up in one message. Refuses a name held by an
        account without the claim's role."""
        role = claim_role(batch)
        names = [claim_username(batch, k) for k in range(MAX_CLAIM_SESSIONS)]
        answers = self.call([{"command": "getClient", "username": n} for n in names],
                            tolerate=("Client not found",))
        found: dict[int, dict[str, Any]] = {}
        for k, (name, ans) in enumerate(zip(names, answers, strict=True)):
            data = ans.get("data")
            client = data.get("client") if ans.get("error") is None and \
                isinstance(data, dict) else None
            if not isinstance(client, dict):
                continue
            if role not in self._roles(client):
                raise BrokerAdminError(
                    f"claim account {name!r} names a broker account that is not a claim "
                    "account (a service, operator or device account): refused")
            found[k] = client
        return found

    def ensure_claim(self, batch: str, password: str,
                     sessions: int = DEFAULT_CLAIM_SESSIONS) -> None:
        """Make the claim of ``batch``: ``sessions`` accounts (``_claim-<batch>``,
        ``_claim1-<batch>``...) with ``password`` and the role ``claim:<batch>``, enabled,
        in one command message; existing ones get the new password (which closes their
        connections), session accounts beyond ``sessions`` (an earlier claim's) are
        deleted."""
        sessions = check_claim_sessions(sessions)
        role = claim_role(batch)
        for _ in range(2):
            have = self._claim_accounts(batch)
            cmds = self._role_commands(role, claim_lines(self.topics, batch), current=True)
            creates = 0
            for k in range(sessions):
                user = claim_username(batch, k)
                if k in have:
                    cmds += [{"command": "setClientPassword", "username": user,
                              "password": password},
                             {"command": "enableClient", "username": user}]
                else:
                    creates += 1
                    cmds.append({"command": "createClient", "username": user,
                                 "password": password,
                                 "roles": [{"rolename": role, "priority": 0}]})
            cmds += [{"command": "deleteClient", "username": claim_username(batch, k)}
                     for k in sorted(have) if k >= sessions]
            answers = self.call(cmds, tolerate=("Role already exists", "Client already exists",
                                                "Client not found"))
            # Another admin may have created a session between our look and our
            # createClient: then it exists, and the second pass sets its password.
            if not any(a.get("error") == "Client already exists" for a in answers):
                return
        raise BrokerAdminError(f"claim {batch!r}: its accounts kept changing under us")

    def delete_claim(self, batch: str) -> None:
        """Delete every session account of the claim of ``batch`` (whatever their number:
        all possible names are looked up) and its role; closes their connections. Absent
        is fine."""
        have = self._claim_accounts(batch)
        cmds: list[dict[str, Any]] = [
            {"command": "deleteClient", "username": claim_username(batch, k)}
            for k in sorted(have)]
        cmds.append({"command": "deleteRole", "rolename": claim_role(batch)})
        self.call(cmds, tolerate=("Role not found", "Client not found"))


# -- broker init -------------------------------------------------------------------------


def password_record(password: str, *, iterations: int = HASH_ITERATIONS,
                    salt: bytes | None = None) -> dict[str, Any]:
    """A dynsec client's password fields: base64 PBKDF2-HMAC-SHA512 digest and salt."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return {"password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": iterations}


def plugin_path() -> str:
    """This machine's dynsec plugin (Debian and Ubuntu put it under the multiarch dir)."""
    found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")
                   + glob.glob("/usr/lib/mosquitto_dynamic_security.so")
                   + glob.glob("/usr/local/lib/mosquitto_dynamic_security.so"))
    if not found:
        arch = platform.machine()
        return f"/usr/lib/{arch}-linux-gnu/mosquitto_dynamic_security.so"
    return found[0]


#: The settings of examples/mosquitto/mosquitto.conf that a dynsec broker keeps.
_LIMITS = """\
# A session is named after its user, whatever client id the client sends: nobody can
# take a device's session. One user is then one connection at a time (a second one
# takes the session): claim accounts' enrolment exchanges are short and retry.
use_username_as_clientid true
# Same limits as AWS IoT Core: edge-sdk keeps every message under 128 KiB.
max_packet_size 131072
max_qos 1
set_tcp_nodelay true
"""

_QUEUES = """\
max_inflight_messages 64
max_queued_messages 1000
"""


def mosquitto_settings(dynsec_json: Path) -> str:
    """The lines of a dynsec broker's config that name no listener, certificate or
    persistence directory (tests start brokers with these)."""
    return (f"plugin {plugin_path()}\n"
            f"plugin_opt_config_file {dynsec_json}\n"
            "allow_anonymous false\n" + _LIMITS)


def _conf_text(dynsec_json: Path) -> str:
    # The listener first: Mosquitto 2.0.11 makes a default listener (port 1883, every
    # interface) for a plugin line that comes before any listener.
    return ("# Mosquitto with the dynamic security plugin for an edge-sdk fleet (written by\n"
            "# `edge-sdk broker init`). Accounts change at run time through the plugin;\n"
            "# the broker rewrites the JSON file on every change.\n"
            "per_listener_settings false\n\n"
            "# Devices and services on TLS: put your certificates here.\n"
            "listener 8883\n"
            "cafile /etc/mosquitto/certs/ca.crt\n"
            "certfile /etc/mosquitto/certs/server.crt\n"
            "keyfile /etc/mosquitto/certs/server.key\n\n"
            + mosquitto_settings(dynsec_json)
            + "\n# Retained messages (deployments, announcements) survive restarts.\n"
            "persistence true\npersistence_location /var/lib/mosquitto/\n" + _QUEUES)


def broker_user() -> pwd.struct_passwd | None:
    """The ``mosquitto`` account when running as root (the broker reads and writes the
    plugin's file as it)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


def dynsec_document(fleet: str, accounts: Mapping[str, tuple[str, str]], *,
                    prefix: str = "edge") -> dict[str, Any]:
    """The plugin's JSON: ``accounts`` is {user: (password, role)}."""
    topics = Topics(fleet, prefix)
    roles = service_roles(topics)
    return {
        "clients": [{"username": user, **password_record(pw),
                     "roles": [{"rolename": role, "priority": 0}]}
                    for user, (pw, role) in accounts.items()],
        "roles": [{"rolename": name, "acls": _acls(lines)} for name, lines in roles.items()],
        "groups": [],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
    }


def broker_config(outdir: Path, *, fleet: str, operators: Sequence[str] = (),
                  responders: Sequence[str] = (), prefix: str = "edge") -> dict[str, str]:
    """Write ``dynamic-security.json``, ``mosquitto.conf`` and ``credentials.json`` (the
    generated passwords, 0600) to ``outdir``; return {user: password}. Accounts:
    ``edge-serve``, ``edge-fleet`` (both also dynsec's admins), the responders (default
    ``edge-repo``) and operators (default ``edge-operator-1`` and ``-2``). Run as root, it
    gives the plugin's file and ``outdir`` to the ``mosquitto`` user: the broker drops to
    it and rewrites the file on every change."""
    check_topic_word(fleet, "fleet")
    responders = list(responders or [RESPONDER])
    operators = list(operators or OPERATORS)
    users = [SERVE, FLEET, *responders, *operators]
    for name in users:
        check_topic_word(name, "account name")
    if len(set(users)) != len(users):
        twice = sorted({u for u in users if users.count(u) > 1})
        raise ConfigError(f"{', '.join(twice)}: each account name once")
    role_of = {SERVE: "svc:serve", FLEET: "svc:fleet",
               **dict.fromkeys(responders, "svc:responder"),
               **dict.fromkeys(operators, "svc:operator")}
    creds = {u: secrets.token_urlsafe(24) for u in users}
    outdir = outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    dynsec_json = outdir / "dynamic-security.json"
    doc = dynsec_document(fleet, {u: (creds[u], role_of[u]) for u in users}, prefix=prefix)
    # The accounts' file last: it is the one a second run refuses to overwrite, so a run
    # that fails before it (disk full, no permission) can simply be run again; and no
    # broker ever holds accounts whose passwords were not saved.
    atomic_write_text(outdir / "credentials.json", json.dumps(creds, indent=2) + "\n")
    os.chmod(outdir / "credentials.json", 0o600)
    atomic_write_text(outdir / "mosquitto.conf", _conf_text(dynsec_json))
    os.chmod(outdir / "mosquitto.conf", 0o644)
    atomic_write_text(dynsec_json, json.dumps(doc, indent=1) + "\n")
    broker = broker_user()
    if broker is not None:
        # credentials.json stays root's: it is for the operator, not the broker.
        os.chown(dynsec_json, broker.pw_uid, broker.pw_gid)
        os.chown(outdir, broker.pw_uid, broker.pw_gid)
    return creds


__all__ = ["BrokerAdminError", "DynsecAdmin", "broker_config", "broker_user",
           "claim_role", "device_role", "group_role", "mosquitto_settings", "password_record",
           "plugin_path"]
