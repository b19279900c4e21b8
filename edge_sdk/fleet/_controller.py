"""The rollout controller inside ``edge-sdk serve``, and the rollout records the CLI writes.

The database is the authority: ``edge-sdk rollout start|pause|resume|abort`` write a
rollout row or a command row; the controller polls for them, runs each rollout's state
machine (:mod:`._machine`) and saves its state before carrying out any effect. The
controller holds the deployment key (it signs each wave) and refuses a key file that
its group or others can read.

One controller per fleet and database: :meth:`Controller.start` takes the fleet's lease
(:class:`LeaseHeld` when another controller has it), every saved state renews it in the
same transaction — a controller whose lease went to another one can commit nothing and
stops (:attr:`Controller.lost`) — and :meth:`Controller.stop` gives it up.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import EdgeError
from ..release._deploy import clear_deployment, create_deployment
from ..release._repository import Repository
from ..transport import MqttConnection, Topics
from ..transport._config import check_topic_word
from ..trust._keys import DEPLOYMENT_ROLE
from . import _machine as m
from ._db import (
    ACTIVE_STATUSES,
    FleetDB,
    FleetError,
    FleetUsageError,
    LeaseLost,
    device_events,
    devices,
    json_text,
    json_value,
    rollout_commands,
    rollout_devices,
    rollouts,
)

log = logging.getLogger("edge_sdk.fleet.controller")

#: Test-only: the controller kills itself with SIGKILL the first time it reaches the named
#: point (``NAME:N``: the N-th time). The kill -9 tests crash at each one.
CRASH_ENV = "EDGE_SDK_FLEET_CRASH_AT"
#: ``signing``: a deployment is signed (its counter used) but not saved; ``signed``: saved,
#: not yet published; ``published``: published to the first of its devices only.
CRASH_POINTS = ("signing", "signed", "published")
_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    assert name in CRASH_POINTS, f"crash point {name!r} is missing from CRASH_POINTS"
    at = os.environ.get(CRASH_ENV)
    if not at:
        return
    want, _, nth = at.partition(":")
    if want == name:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)

_DEVICE_FIELDS = [f for f in m.DeviceProgress.__dataclass_fields__ if f != "wave"]


# -- selectors -----------------------------------------------------------------------------

def matches(selector: Mapping[str, Any], dev: Mapping[str, Any]) -> bool:
    """A device matches when it is named, is in one of the groups, or has one of the tags
    (``KEY`` or ``KEY=VALUE``, looked up in its tags, then its hardware facts)."""
    if dev["id"] in selector.get("devices", ()):
        return True
    if set(selector.get("groups", ())) & set(dev["groups"]):
        return True
    for tag in selector.get("tags", ()):
        k, sep, v = tag.partition("=")
        attrs = {**dev["hardware"], **dev["tags"]}
        if k in attrs and (not sep or str(attrs[k]) == v):
            return True
    return False


_UNDEPLOYABLE_WARNED: set[str] = set()


def _deployable(device: str) -> bool:
    """False (with one warning per id) for a registered id no deployment can name: a '.'
    or another character an older agent accepted, which would fail the signing of the
    whole wave it landed in."""
    try:
        check_topic_word(device, "device id")
    except EdgeError as err:
        if device not in _UNDEPLOYABLE_WARNED and len(_UNDEPLOYABLE_WARNED) < 1000:
            _UNDEPLOYABLE_WARNED.add(device)
            log.warning("rollouts leave device %r out: %s", device, err)
        return False
    return True


def members(db: FleetDB, fleet: str, selector: Mapping[str, Any]) -> dict[str, m.Member]:
    # Read on every poll: only the columns a selector looks at, never the state document
    # (most of a row's bytes). Hardware facts are parsed only for a tag selector.
    tagged = bool(selector.get("tags"))
    cols = [devices.c.id, devices.c.groups, devices.c.tags, devices.c.online,
            devices.c.model, devices.c.version, *([devices.c.hardware] if tagged else [])]
    out: dict[str, m.Member] = {}
    with db.read() as c:
        for r in c.execute(sa.select(*cols).where(devices.c.fleet == fleet)
                           .order_by(devices.c.id)):
            if not _deployable(r.id):
                continue
            dev = {"id": r.id, "groups": json_value(r.groups, []),
                   "tags": json_value(r.tags, {}),
                   "hardware": json_value(r.hardware, {}) if tagged else {}}
            if matches(selector, dev):
                out[r.id] = m.Member(bool(r.online), r.model, r.version)
    return out


# -- rollout records (the CLI) -------------------------------------------------------------

def start_rollout(db: FleetDB, *, fleet: str, model: str, version: str,
                  selector: Mapping[str, Sequence[str]], spec: m.RolloutSpec,
                  actor: str) -> int:
    """Create a rollout record (the controller picks it up). Raises
    :class:`FleetUsageError` when the selector matches no registered device."""
    sel = {k: list(v) for k, v in selector.items() if v}
    if not sel:
        raise FleetUsageError("name at least one --group, --tag or --device")
    found = members(db, fleet, sel)
    if not found:
        raise FleetUsageError(f"the selector {_describe(sel)} matches no device registered in "
                              f"fleet {fleet!r} (see 'edge-sdk status --db ...')")
    now = time.time()
    with db.begin() as c:
        rid = c.execute(rollouts.insert().values(
            fleet=fleet, model=model, version=version, selector=json_text(sel),
            config=json_text(spec.to_json()), status="pending", wave=0, waves=0,
            created=now, updated=now, created_by=actor, machine="{}",
        ).returning(rollouts.c.id)).scalar_one()
        db.record_audit(actor, "rollout.start", {
            "rollout": rid, "fleet": fleet, "model": model, "version": version,
            "selector": sel, **spec.to_json()}, conn=c)
    return int(rid)


def _describe(sel: Mapping[str, Sequence[str]]) -> str:
    return " ".join(f"{k}={','.join(v)}" for k, v in sel.items())


def command_rollout(db: FleetDB, rollout_id: int, command: str, actor: str) -> None:
    """Queue ``pause``/``resume``/``abort`` for the controller. Raises
    :class:`FleetUsageError` for an unknown rollout or one the command does not apply to."""
    with db.begin() as c:
        row = c.execute(sa.select(rollouts.c.status).where(rollouts.c.id == rollout_id)
                        .with_for_update()).first()
        if row is None:
            raise FleetUsageError(f"no rollout {rollout_id}")
        pending = c.execute(sa.select(rollout_commands.c.command).where(
            (rollout_commands.c.rollout == rollout_id) & rollout_commands.c.done.is_(None))
            .order_by(rollout_commands.c.seq)).scalars().all()
        status = row.status
        for earlier in pending:  # what the status will be once queued commands are applied
            status = {"pause": "paused", "resume": "running", "abort": "aborting"}[earlier]
        try:
            m.check_command(status, command)
        except m.CommandRefused as err:
            raise FleetUsageError(f"cannot {command} rollout {rollout_id}: {err}") from None
        c.execute(rollout_commands.insert().values(rollout=rollout_id, command=command,
                                                   actor=actor, created=time.time()))
        db.record_audit(actor, f"rollout.{command}", {"rollout": rollout_id}, conn=c)


# -- state in the database -----------------------------------------------------------------

def load_state(c: Connection, rollout_id: int) -> m.RolloutState:
    h = c.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).mappings().one()
    extra = json_value(h["machine"], {})
    st = m.RolloutState(
        id=h["id"], model=h["model"], version=h["version"],
        spec=m.RolloutSpec.from_json(json_value(h["config"], {})), status=h["status"],
        wave=h["wave"], waves=h["waves"], reason=h["reason"],
        tokens=float(extra.get("tokens", 0.0)), tokens_at=float(extra.get("tokens_at", 0.0)),
        approved=int(extra.get("approved", 0)), held=bool(extra.get("held", False)),
        republished_at=float(extra.get("republished_at", 0.0)))
    for r in c.execute(sa.select(rollout_devices).where(
            rollout_devices.c.rollout == rollout_id)).mappings():
        p = m.DeviceProgress(wave=r["wave"])
        for f in _DEVICE_FIELDS:
            if f in r:
                setattr(p, f, r[f])
        st.devices[r["device"]] = p
    return st


def save_state(c: Connection, st: m.RolloutState, old: m.RolloutState | None) -> None:
    c.execute(rollouts.update().where(rollouts.c.id == st.id).values(
        status=st.status, wave=st.wave, waves=st.waves, reason=st.reason, updated=time.time(),
        machine=json_text({"tokens": st.tokens, "tokens_at": st.tokens_at,
                           "approved": st.approved, "held": st.held,
                           "republished_at": st.republished_at})))
    for d, p in st.devices.items():
        before = old.devices.get(d) if old is not None else None
        if before == p:
            continue
        row = {f: getattr(p, f) for f in _DEVICE_FIELDS}
        row["wave"] = p.wave
        exists = before is not None or c.execute(sa.select(rollout_devices.c.device).where(
            (rollout_devices.c.rollout == st.id) & (rollout_devices.c.device == d))
        ).first() is not None
        if exists:
            c.execute(rollout_devices.update().where(
                (rollout_devices.c.rollout == st.id) & (rollout_devices.c.device == d))
                .values(**row))
        else:
            c.execute(rollout_devices.insert().values(rollout=st.id, device=d, **row))


# -- the controller ------------------------------------------------------------------------

def check_key_permissions(repo: Repository) -> None:
    """Refuse deployment keys (and their directory) readable by group or others."""
    kdir = repo.keys.dir / DEPLOYMENT_ROLE
    for p in [kdir, *sorted(kdir.glob("*.pem"))]:
        try:
            mode = p.stat().st_mode
        except OSError as err:
            raise FleetError(f"{p}: cannot read the deployment key: {err.strerror}") from err
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise FleetError(f"{p}: the deployment key is readable by group or others "
                             f"(mode {stat.S_IMODE(mode):o}); chmod go-rwx it")


class Controller:
    """Runs every active rollout of one fleet from the database, one poll at a time."""

    def __init__(self, db: FleetDB, repo: Repository, connection: MqttConnection, *,
                 topics: Topics | None = None, poll_s: float = 0.5,
                 lease_ttl: float = 15.0) -> None:
        """``lease_ttl``: how long the lease outlives this controller's last save or poll
        (a controller killed with SIGKILL is taken over after that long)."""
        check_key_permissions(repo)
        self.db = db
        self.repo = repo
        self.conn = connection
        self.topics = topics or Topics.for_config(connection.config)
        self.poll_s = poll_s
        self.lease_ttl = lease_ttl
        #: Who this controller is in the lease table (and in the refusal others print).
        self.holder = f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(3)}"
        self._leased = False
        #: Why the controller stopped on its own (its lease went to another), else None.
        self.lost: str | None = None
        self._states: dict[int, m.RolloutState] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fleet-controller", daemon=True)

    def acquire(self) -> None:
        """Take the fleet's lease. Raises :class:`LeaseHeld` while another controller
        holds it (call again to wait for it)."""
        self.db.acquire_lease(self.topics.fleet, self.holder, self.lease_ttl)
        self._leased = True

    def start(self) -> Controller:
        if not self._leased:
            self.acquire()
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        if self._leased and self.lost is None:
            try:
                self.db.release_lease(self.topics.fleet, self.holder)
            except (FleetError, sa.exc.SQLAlchemyError) as err:
                log.warning("controller lease not released (it expires): %s", err)
        self._leased = False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except LeaseLost as err:
                self.lost = str(err)
                log.error("%s", err)
                return
            except (EdgeError, sa.exc.SQLAlchemyError) as err:
                log.warning("controller: %s", str(err).splitlines()[0])
                self._states.clear()  # reload from the record next time
            except Exception:
                log.exception("controller poll failed")
                self._states.clear()
            self._stop.wait(self.poll_s)

    def poll(self) -> None:
        if self._leased:
            self.db.renew_lease(self.topics.fleet, self.holder, self.lease_ttl)
        with self.db.read() as c:
            ids = c.execute(sa.select(rollouts.c.id).where(
                (rollouts.c.fleet == self.topics.fleet)
                & rollouts.c.status.in_(ACTIVE_STATUSES)).order_by(rollouts.c.id)
            ).scalars().all()
        for rid in ids:
            self._poll_one(int(rid))
        for rid in [r for r in self._states if r not in ids]:
            del self._states[rid]

    def _apply(self, st: m.RolloutState, event: m.Event,
               command_seq: int | None = None) -> m.RolloutState:
        new, effects = m.step(st, event)
        with self.db.begin() as c:
            if self._leased:  # nothing is saved, so nothing is done, without the lease
                self.db.renew_lease(self.topics.fleet, self.holder, self.lease_ttl, conn=c)
            save_state(c, new, st)
            if command_seq is not None:
                c.execute(rollout_commands.update().where(
                    rollout_commands.c.seq == command_seq).values(done=time.time()))
        self._states[new.id] = new
        for fx in effects:
            new = self._effect(new, fx)
        return new

    def _poll_one(self, rid: int) -> None:
        st = self._states.get(rid)
        if st is None:
            with self.db.read() as c:
                st = load_state(c, rid)
            st = self._apply(st, m.Restarted(time.time()))
        with self.db.read() as c:
            cmds = c.execute(sa.select(rollout_commands).where(
                (rollout_commands.c.rollout == rid) & rollout_commands.c.done.is_(None))
                .order_by(rollout_commands.c.seq)).mappings().all()
        for cmd in cmds:
            event = m.Command(cmd["command"], time.time(), cmd["actor"])
            try:
                st = self._apply(st, event, command_seq=cmd["seq"])
            except m.IllegalEvent as err:  # a row not written by this code: skip it once
                log.warning("%s", err)
                with self.db.begin() as c:
                    c.execute(rollout_commands.update().where(
                        rollout_commands.c.seq == cmd["seq"]).values(done=time.time()))
        with self.db.read() as c:
            sel = json_value(c.execute(sa.select(rollouts.c.selector).where(
                rollouts.c.id == rid)).scalar_one(), {})
        mem = members(self.db, self.topics.fleet, sel)
        self._apply(st, m.Tick(time.time(), mem, self._reports(st)))

    def _reports(self, st: m.RolloutState) -> list[m.Report]:
        waiting: dict[str, set[int]] = {}
        for d, p in st.devices.items():
            if p.status == "sent" and p.counter is not None:
                waiting.setdefault(d, set()).add(p.counter)
            if p.rollback_status == "sent" and p.rollback_counter is not None:
                waiting.setdefault(d, set()).add(p.rollback_counter)
        if not waiting:
            return []
        out: list[m.Report] = []
        counters = sorted({n for s in waiting.values() for n in s})
        with self.db.read() as c:
            for r in c.execute(sa.select(devices.c.id, devices.c.last_deployment,
                                         devices.c.last_result, devices.c.last_reason).where(
                    (devices.c.fleet == self.topics.fleet)
                    & devices.c.id.in_(list(waiting)))):
                if r.last_deployment in waiting[r.id] and r.last_result in m.FINISHED:
                    out.append(m.Report(r.id, r.last_deployment, r.last_result,
                                        r.last_reason))
            for r in c.execute(sa.select(device_events.c.device, device_events.c.deployment,
                                         device_events.c.kind, device_events.c.reason).where(
                    (device_events.c.fleet == self.topics.fleet)
                    & device_events.c.deployment.in_(counters)
                    & device_events.c.kind.in_(m.BAD))):
                if r.device in waiting and r.deployment in waiting[r.device]:
                    out.append(m.Report(r.device, r.deployment, r.kind, r.reason))
        return out

    def _effect(self, st: m.RolloutState, fx: m.Effect) -> m.RolloutState:
        if isinstance(fx, m.Sign):
            try:
                signed = create_deployment(self.repo, model=st.model, fleet=self.topics.fleet,
                                           version=fx.version, devices=fx.devices,
                                           rollback=fx.rollback)
            except EdgeError as err:
                log.warning("rollout %d: cannot sign for %s: %s", st.id,
                            ", ".join(fx.devices), err)
                return self._apply(st, m.SignFailed(fx.devices, str(err), fx.rollback,
                                                    time.time()))
            crash_point("signing")
            return self._apply(st, m.Signed(fx.devices, signed.deployment.counter,
                                            signed.document.decode(), fx.rollback,
                                            time.time()))
        if isinstance(fx, m.Publish):
            crash_point("signed")
            doc = fx.document.encode()
            for d in fx.devices:
                self.conn.publish_wait(self.topics.desired(d), doc, qos=1, retain=True)
                crash_point("published")
            return st
        clear_deployment(self.conn, self.topics.desired(fx.device))
        return st


def actor_name(operator: str | None) -> str:
    """``--operator``, else ``EDGE_OPERATOR``, else the OS user."""
    if operator:
        return operator
    env = os.environ.get("EDGE_OPERATOR")
    if env:
        return env
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def audit(db_url: str, actor: str, action: str, params: Mapping[str, Any]) -> None:
    """Append one operator action to the audit log of the database at ``db_url``."""
    with FleetDB.open(db_url) as db:
        db.record_audit(actor, action, params)


__all__ = ["Controller", "actor_name", "audit", "check_key_permissions", "command_rollout",
           "start_rollout"]
