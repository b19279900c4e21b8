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

What every device's retained ``desired`` topic must hold is part of the record
(``device_desired``), saved with the state that causes it; publishing and clearing only
make the broker equal to it, so they are repeated until the broker acknowledged them,
after a restart, and by the next lease holder. The lease also fences what a controller
publishes: before each publish it must hold the lease for longer than a margin. A
controller paused between that check and its publish can still land one message late;
the new holder watches the retained topics and puts the record back at once (and the
agent refuses a deployment older than one it already took).
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
from ..release._deploy import (
    clear_deployment,
    create_deployment,
    last_deployment,
    last_document,
)
from ..release._repository import Repository
from ..transport import MqttConnection, Topics
from ..transport._config import check_topic_word
from ..trust._deployment import compare_versions
from ..trust._keys import DEPLOYMENT_ROLE
from . import _machine as m
from ._db import (
    ACTIVE_STATUSES,
    FleetDB,
    FleetError,
    FleetUsageError,
    LeaseLost,
    chunks,
    device_assignments,
    device_desired,
    device_events,
    devices,
    json_text,
    json_value,
    registry_stats,
    rollout_commands,
    rollout_devices,
    rollouts,
    valid_id,
)
from ._retained import Held, RetainedDesired, digest
from ._select import check_selector, operator_part, selects, split_tags

log = logging.getLogger("edge_sdk.fleet.controller")

#: Test-only: the controller kills itself with SIGKILL the first time it reaches the named
#: point (``NAME:N``: the N-th time). The kill -9 tests crash at each one.
CRASH_ENV = "EDGE_SDK_FLEET_CRASH_AT"
#: Test-only, the same points: the controller stops itself with SIGSTOP there, as a process
#: the OS or a hypervisor pauses; the lease tests let its lease expire, then SIGCONT it.
PAUSE_ENV = "EDGE_SDK_FLEET_PAUSE_AT"
#: ``signing``: a deployment is signed (its counter used) but not saved; ``signed``: saved,
#: not yet published; ``published``: published to the first of its devices only;
#: ``aborted``: an abort is saved, none of its clears or rollbacks carried out;
#: ``publishing``: about to publish one device's topic, before the lease check; ``fenced``:
#: after it.
CRASH_POINTS = ("signing", "signed", "published", "aborted", "publishing", "fenced")
_reached: dict[tuple[str, str], int] = {}


def crash_point(name: str) -> None:
    assert name in CRASH_POINTS, f"crash point {name!r} is missing from CRASH_POINTS"
    for env, sig in ((CRASH_ENV, signal.SIGKILL), (PAUSE_ENV, signal.SIGSTOP)):
        at = os.environ.get(env)
        if not at:
            continue
        want, _, nth = at.partition(":")
        if want == name:
            _reached[env, name] = _reached.get((env, name), 0) + 1
            if _reached[env, name] == int(nth or 1):
                # At this thread: sent to the process, the signal may be taken by another
                # thread while this one runs on a little way.
                signal.pthread_kill(threading.get_ident(), sig)

_DEVICE_FIELDS = [f for f in m.DeviceProgress.__dataclass_fields__ if f != "wave"]


# -- selectors -----------------------------------------------------------------------------

def matches(selector: Mapping[str, Any], dev: Mapping[str, Any]) -> bool:
    """A device matches when it is named, or the operator assigned it one of the groups or
    tags (``KEY`` or ``KEY=VALUE``); ``hw.KEY[=VALUE]`` tags then narrow that to the
    devices whose reported hardware facts match (see :mod:`._select`). What a device
    reports about its own groups and tags never selects it."""
    return selects(selector, dev)


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
    """The registered devices of ``fleet`` that ``selector`` names (:func:`matches`)."""
    # Read on every poll: only the columns a selector looks at, never the state document
    # (most of a row's bytes). Hardware facts are parsed only for a hw. filter.
    if not operator_part(selector):
        return {}  # hardware facts alone select no one: a device could claim any
    a = device_assignments
    hw = bool(split_tags(selector.get("tags", ()))[1])
    cols = [devices.c.id, a.c.groups, a.c.tags, devices.c.online, devices.c.model,
            devices.c.version, *([devices.c.hardware] if hw else [])]
    q = sa.select(*cols).select_from(devices.outerjoin(
        a, (a.c.fleet == devices.c.fleet) & (a.c.id == devices.c.id)))
    out: dict[str, m.Member] = {}
    with db.read() as c:
        for r in c.execute(q.where(devices.c.fleet == fleet).order_by(devices.c.id)):
            if not _deployable(r.id):
                continue
            dev = {"id": r.id, "groups": json_value(r.groups, []),
                   "tags": json_value(r.tags, {}),
                   "hardware": json_value(r.hardware, {}) if hw else {}}
            if matches(selector, dev):
                out[r.id] = m.Member(bool(r.online), r.model, r.version)
    return out


# -- rollout records (the CLI) -------------------------------------------------------------

def start_rollout(db: FleetDB, *, fleet: str, model: str, version: str,
                  selector: Mapping[str, Sequence[str]], spec: m.RolloutSpec,
                  actor: str, repo: Repository | None = None) -> int:
    """Create a rollout record (the controller picks it up). Raises
    :class:`FleetUsageError` when the selector matches no registered device, or when
    ``version`` is older than what one of them runs or was last sent (by a rollout, or
    signed in ``repo``): a downgrade, which only a rollback rollout
    (``spec.signed_rollback``) deploys; :func:`check_selector`'s errors for a malformed
    selector or id."""
    check_selector(fleet, selector)
    sel = {k: list(v) for k, v in selector.items() if v}
    if not sel:
        raise FleetUsageError("name at least one --group, --tag or --device")
    if not operator_part(sel):
        raise FleetUsageError(
            f"the selector {_describe(sel)} names only hardware facts, which devices report "
            "about themselves: hw.KEY=VALUE narrows a selection; name --group, --tag or "
            "--device too")
    found = members(db, fleet, sel)
    if not found:
        raise FleetUsageError(f"the selector {_describe(sel)} matches no device registered in "
                              f"fleet {fleet!r}{_claimed(db, fleet, sel)} (see 'edge-sdk "
                              "status --db ...')")
    if not spec.signed_rollback:
        _refuse_downgrade(db, fleet, model, version, found, repo)
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


def _refuse_downgrade(db: FleetDB, fleet: str, model: str, version: str,
                      found: Mapping[str, m.Member], repo: Repository | None) -> None:
    newer: dict[str, str] = {}  # device -> the newest version of the model it has or was sent

    def seen(device: str, mdl: object, ver: object) -> None:
        if mdl == model and isinstance(ver, str) and compare_versions(version, ver) < 0 \
                and (device not in newer or compare_versions(ver, newer[device]) > 0):
            newer[device] = ver

    for d, mem in found.items():
        seen(d, mem.model, mem.version)
        if repo is not None:
            last = last_deployment(repo, d)
            if last is not None:
                seen(d, last.get("model"), last.get("version"))
    with db.read() as c:
        for part in chunks(sorted(found), 500):
            for r in c.execute(sa.select(device_desired.c.device, device_desired.c.model,
                                         device_desired.c.version).where(
                    (device_desired.c.fleet == fleet) & device_desired.c.device.in_(part))):
                seen(r.device, r.model, r.version)
    if newer:
        some = ", ".join(f"{d} has {v}" for d, v in sorted(newer.items())[:3])
        more = f" and {len(newer) - 3} more" if len(newer) > 3 else ""
        raise FleetUsageError(f"{model} {version} for {len(newer)} selected device(s) ({some}"
                              f"{more}) is a downgrade: start it with --rollback for a signed "
                              "rollback rollout")


def _describe(sel: Mapping[str, Sequence[str]]) -> str:
    return " ".join(f"{k}={','.join(v)}" for k, v in sel.items())


def _claimed(db: FleetDB, fleet: str, sel: Mapping[str, Sequence[str]]) -> str:
    """Why the selector may match no one: devices that only report those groups or tags."""
    as_reported = {**sel, "devices": []}
    claim = [d["id"] for d in db.devices(fleet=fleet) if d["registered"] and selects(
        as_reported, {**d, "groups": d["reported_groups"], "tags": d["reported_tags"]})]
    if not claim:
        return ""
    more = f" and {len(claim) - 3} more" if len(claim) > 3 else ""
    return (f"; {len(claim)} device(s) report it about themselves ({', '.join(claim[:3])}"
            f"{more}), which selects no one: assign them with 'edge-sdk device set DEVICE "
            "--group G --tag K=V'")


def command_rollout(db: FleetDB, rollout_id: int, command: str, actor: str, *,
                    note: Mapping[str, Any] | None = None) -> None:
    """Queue ``pause``/``resume``/``abort`` for the controller, or ``approve``: the
    ``resume`` of a rollout the controller held after a wave (``pause_after_wave``),
    refused for any other. Audit-logged as ``rollout.COMMAND`` by ``actor`` with ``note``
    added to its parameters. Raises :class:`FleetUsageError` for an unknown rollout or
    one the command does not apply to."""
    if not valid_id(rollout_id):
        raise FleetUsageError(f"no rollout {rollout_id}")
    with db.begin() as c:
        row = c.execute(sa.select(rollouts.c.status, rollouts.c.machine)
                        .where(rollouts.c.id == rollout_id).with_for_update()).first()
        if row is None:
            raise FleetUsageError(f"no rollout {rollout_id}")
        pending = c.execute(sa.select(rollout_commands.c.command).where(
            (rollout_commands.c.rollout == rollout_id) & rollout_commands.c.done.is_(None))
            .order_by(rollout_commands.c.seq)).scalars().all()
        status = row.status
        for earlier in pending:  # what the status will be once queued commands are applied
            status = {"pause": "paused", "resume": "running", "abort": "aborting"}[earlier]
        queued = command
        if command == "approve":
            if status == "paused" and not pending and \
                    json_value(row.machine, {}).get("held", False):
                queued = "resume"
            else:
                raise FleetUsageError(f"cannot approve rollout {rollout_id}: it is {status}, "
                                      "not waiting for approval after a wave")
        try:
            m.check_command(status, queued)
        except m.CommandRefused as err:
            raise FleetUsageError(f"cannot {command} rollout {rollout_id}: {err}") from None
        c.execute(rollout_commands.insert().values(rollout=rollout_id, command=queued,
                                                   actor=actor, created=time.time()))
        db.record_audit(actor, f"rollout.{command}", {"rollout": rollout_id, **(note or {})},
                        conn=c)


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
        looked_at=float(extra.get("looked_at", 0.0)))
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
                           "looked_at": st.looked_at})))
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


def save_desired(c: Connection, fleet: str, st: m.RolloutState, old: m.RolloutState | None,
                 *, backfill: bool = False) -> None:
    """Record, unpublished, what each device's retained ``desired`` topic must hold where
    ``st`` changed it from ``old``; with ``backfill``, only where nothing is recorded yet (a
    rollout saved by an edge-sdk that kept no such record)."""
    now = time.time()
    recorded: set[str] = set()
    if backfill:
        for part in chunks(sorted(st.devices), 500):
            recorded.update(c.execute(sa.select(device_desired.c.device).where(
                (device_desired.c.fleet == fleet) & device_desired.c.device.in_(part))
            ).scalars())
    for d in st.devices:
        if d in recorded:
            continue
        want = m.desired(st, d)
        if want is None:
            continue
        if not backfill and old is not None and d in old.devices \
                and m.desired(old, d) == want:
            continue
        doc = want.document
        key = (device_desired.c.fleet == fleet) & (device_desired.c.device == d)
        if doc is None and want.counter is not None:
            # Withdrawing a document another rollout has replaced since: leave its newer one.
            now_counter = c.execute(sa.select(device_desired.c.counter).where(key)).scalar()
            if now_counter is not None and now_counter > want.counter:
                continue
        values = {"document": doc, "digest": None if doc is None else digest(doc.encode()),
                  "counter": want.counter, "model": None if doc is None else st.model,
                  "version": want.version, "rollout": st.id, "changed": now,
                  "published": None}
        if backfill:
            c.execute(device_desired.insert().values(fleet=fleet, device=d, seq=1, **values))
            continue
        done = c.execute(device_desired.update().where(key).values(
            seq=device_desired.c.seq + 1, **values))
        if done.rowcount == 0:
            c.execute(device_desired.insert().values(fleet=fleet, device=d, seq=1, **values))


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
                 lease_ttl: float = 15.0, lease_margin: float | None = None) -> None:
        """``lease_ttl``: how long the lease outlives this controller's last save or poll
        (a controller killed with SIGKILL is taken over after that long).
        ``lease_margin`` (default a third of ``lease_ttl``): nothing is published with less
        of the lease left than this; it must cover the clock difference between the hosts
        of two controllers and the time a publish takes to reach the broker."""
        check_key_permissions(repo)
        margin = lease_ttl / 3 if lease_margin is None else lease_margin
        if not 0 < margin < lease_ttl:
            raise FleetUsageError(f"the lease margin ({margin:g} s) must be > 0 and less than "
                                  f"the lease ({lease_ttl:g} s)")
        self.db = db
        self.repo = repo
        self.conn = connection
        self.topics = topics or Topics.for_config(connection.config)
        self.poll_s = poll_s
        self.lease_ttl = lease_ttl
        self.lease_margin = margin
        #: Monotonic time until which this controller surely holds the lease (its last
        #: renewal started then plus ``lease_ttl``).
        self._lease_until = 0.0
        self._retained = RetainedDesired(connection, self.topics)
        self._watching: bool | None = None  # None: not tried yet; False: refused
        self._generation = 0  # of the retained view, when last compared in full
        #: Monotonic times of the full comparisons still due after taking the lease.
        self._full_at: list[float] = []
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
        holds it (call again to wait for it). A controller waiting for the lease already
        watches the retained ``desired`` topics, so it takes over knowing what they hold."""
        self._watch()
        t0 = time.monotonic()
        self.db.acquire_lease(self.topics.fleet, self.holder, self.lease_ttl)
        self._leased = True
        self._lease_until = t0 + self.lease_ttl
        # The previous holder published until its lease ran out, and one publish it made
        # just before may land later still: compare every topic with the record now and
        # once more a lease later.
        self._full_at = [t0, t0 + self.lease_ttl]

    def _watch(self) -> None:
        if self._watching is not None:
            return
        try:
            self._retained.start()
            self._watching = True
        except EdgeError as err:
            self._watching = False
            log.warning("controller: cannot read the retained desired topics (%s); it "
                        "publishes the record of every device in an active rollout again "
                        "after taking the lease instead of comparing",
                        str(err).splitlines()[0])

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
        if self._watching:
            self._retained.stop()
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
            self._renew()
        with self.db.read() as c:
            ids = c.execute(sa.select(rollouts.c.id).where(
                (rollouts.c.fleet == self.topics.fleet)
                & rollouts.c.status.in_(ACTIVE_STATUSES)).order_by(rollouts.c.id)
            ).scalars().all()
        self._reconcile([int(r) for r in ids])
        for rid in ids:
            self._poll_one(int(rid))
        for rid in [r for r in self._states if r not in ids]:
            del self._states[rid]

    def _renew(self) -> None:
        t0 = time.monotonic()
        self.db.renew_lease(self.topics.fleet, self.holder, self.lease_ttl)
        self._lease_until = t0 + self.lease_ttl

    def _apply(self, st: m.RolloutState, event: m.Event,
               command_seq: int | None = None) -> m.RolloutState:
        new, effects = m.step(st, event)
        t0 = time.monotonic()
        with self.db.begin() as c:
            if self._leased:  # nothing is saved, so nothing is done, without the lease
                self.db.renew_lease(self.topics.fleet, self.holder, self.lease_ttl, conn=c)
            save_state(c, new, st)
            save_desired(c, self.topics.fleet, new, st,
                         backfill=isinstance(event, m.Restarted))
            if command_seq is not None:
                c.execute(rollout_commands.update().where(
                    rollout_commands.c.seq == command_seq).values(done=time.time()))
        if self._leased:
            self._lease_until = t0 + self.lease_ttl
        self._states[new.id] = new
        if new.status == "aborting" and st.status != "aborting":
            crash_point("aborted")
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
        heard = self._heard_until()
        self._apply(st, m.Tick(time.time(), mem, self._reports(st), heard_until=heard))

    def _heard_until(self) -> float | None:
        """The registry's progress (``caught_up``): timeouts wait for it. Read before the
        reports, so that every report received before it is in what they see."""
        with self.db.read() as c:
            got = c.execute(sa.select(registry_stats.c.caught_up).where(
                registry_stats.c.fleet == self.topics.fleet)).scalar()
        return None if got is None else float(got)

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
            # Only the newest bad event per waiting device and counter it waits for: rows
            # a device files under other counters, or many under one, are never read.
            ev = device_events
            newest = sa.select(sa.func.max(ev.c.seq)).where(
                (ev.c.fleet == self.topics.fleet) & ev.c.device.in_(list(waiting))
                & ev.c.deployment.in_(counters) & ev.c.kind.in_(m.BAD)
            ).group_by(ev.c.device, ev.c.deployment)
            for r in c.execute(sa.select(ev.c.device, ev.c.deployment, ev.c.kind,
                                         ev.c.reason).where(ev.c.seq.in_(newest))):
                if r.deployment in waiting.get(r.device, ()):
                    out.append(m.Report(r.device, r.deployment, r.kind, r.reason))
        return out

    def _effect(self, st: m.RolloutState, fx: m.Effect) -> m.RolloutState:
        if isinstance(fx, m.Sign):
            try:
                # An abort's send-back returns devices to what they ran, yanked or not.
                signed = create_deployment(self.repo, model=st.model, fleet=self.topics.fleet,
                                           version=fx.version, devices=fx.devices,
                                           rollback=fx.rollback or st.spec.signed_rollback,
                                           allow_yanked=fx.rollback)
            except EdgeError as err:
                log.warning("rollout %d: cannot sign for %s: %s", st.id,
                            ", ".join(fx.devices), err)
                return self._apply(st, m.SignFailed(fx.devices, str(err), fx.rollback,
                                                    time.time()))
            crash_point("signing")
            return self._apply(st, m.Signed(fx.devices, signed.deployment.counter,
                                            signed.document.decode(), fx.rollback,
                                            time.time()))
        # Publish and Clear: put what the record says now on the topics (the effect's own
        # document may have been superseded by another rollout's since).
        if isinstance(fx, m.Publish):
            crash_point("signed")
            if fx.again:  # the retained view may show a copy the broker did not store
                self._publish(sorted(set(fx.devices)))
            else:
                self._drive(fx.devices)
        else:
            self._drive((fx.device,))
        return st

    # -- the retained desired topics -----------------------------------------------------

    def _reconcile(self, active: Sequence[int]) -> None:
        """Make the retained ``desired`` topics equal to the record where they may not be:
        records the broker has not acknowledged yet, topics a message landed on since the
        last poll (another controller's, too), and every recorded topic after taking the
        lease, a lease later, and after each reconnect."""
        if not self.conn.connected:
            return
        full = False
        now = time.monotonic()
        settled = bool(self._watching) and self._retained.settled
        if self._full_at and self._full_at[0] <= now and (settled or not self._watching):
            del self._full_at[0]
            full = True
        if settled and self._retained.generation != self._generation:
            full = True
        if full and settled:
            self._generation = self._retained.generation
        changed = self._retained.take_changed() if self._watching else set()
        d = device_desired.c
        cols = (d.device, d.digest, d.counter, d.seq, d.published)
        fleet = d.fleet == self.topics.fleet
        with self.db.read() as c:
            if full and self._watching:
                rows = list(c.execute(sa.select(*cols).where(fleet)))
            elif full:  # nothing to compare with: publish every active rollout's again
                rows = list(c.execute(sa.select(*cols).where(
                    fleet & (d.published.is_(None) | d.rollout.in_(list(active))))))
            else:
                rows = list(c.execute(sa.select(*cols).where(fleet & d.published.is_(None))))
                seen = {r.device for r in rows}
                for part in chunks(sorted(changed - seen), 500):
                    rows += c.execute(sa.select(*cols).where(fleet & d.device.in_(part)))
        self._publish_where_wrong(rows, everything=full and not self._watching)

    def _drive(self, devices: Sequence[str]) -> None:
        """Publish the record of ``devices`` where the broker may not hold it."""
        d = device_desired.c
        rows: list[Any] = []
        with self.db.read() as c:
            for part in chunks(sorted(set(devices)), 500):
                rows += c.execute(sa.select(d.device, d.digest, d.counter, d.seq,
                                            d.published).where(
                    (d.fleet == self.topics.fleet) & d.device.in_(part)))
        self._publish_where_wrong(rows)

    def _publish_where_wrong(self, rows: Sequence[Any], *, everything: bool = False) -> None:
        """Publish each record whose topic may hold something else; mark the ones the
        retained view shows in place as published."""
        watching = bool(self._watching)
        settled = watching and self._retained.settled
        wrong: list[str] = []
        right: list[tuple[str, int]] = []  # not marked yet, but in place
        for r in rows:
            pending = r.published is None
            if not watching:
                if pending or everything:
                    wrong.append(r.device)
                continue
            held = self._retained.held(r.device)
            if held is None:  # nothing retained, or not replayed yet
                ok = r.digest is None and settled
                if not ok and (settled or pending):
                    wrong.append(r.device)
            else:
                ok = held.digest == r.digest or self._newer_deploy(r, held)
                if not ok:
                    wrong.append(r.device)
            if ok and pending:
                right.append((r.device, r.seq))
        self._confirm(right)
        if wrong:
            self._publish(wrong)

    def _newer_deploy(self, r: Any, held: Held) -> bool:
        """Whether ``held`` is an operator's own later deployment ('edge-sdk deploy'), which
        the record does not take back: newer than the record's and exactly the document
        this repository last signed for the device (not merely claiming a high counter)."""
        if held.counter is None or r.counter is None or held.counter <= r.counter:
            return False
        doc = last_document(self.repo, r.device)
        return doc is not None and digest(doc) == held.digest

    def _publish(self, devices: Sequence[str]) -> None:
        """Publish what the record says on each device's retained ``desired`` topic (an empty
        message for a cleared one), each only while this controller holds the lease."""
        d = device_desired.c
        rows: list[Any] = []
        with self.db.read() as c:
            for part in chunks(devices, 500):
                rows += c.execute(sa.select(d.device, d.document, d.seq).where(
                    (d.fleet == self.topics.fleet) & d.device.in_(part)))
        order = {dev: i for i, dev in enumerate(devices)}
        rows.sort(key=lambda r: order[r.device])
        done: list[tuple[str, int]] = []
        try:
            for r in rows:
                crash_point("publishing")
                timeout = self._fence()
                if not self.conn.connected:
                    # Nothing waits in the connection's queue for a reconnect that may come
                    # after the lease: the rest stays unpublished in the record, for the
                    # next poll on a live link.
                    break
                crash_point("fenced")
                topic = self.topics.desired(r.device)
                if r.document is None:
                    clear_deployment(self.conn, topic, timeout=timeout)
                else:
                    self.conn.publish_wait(topic, r.document.encode(), qos=1, retain=True,
                                           timeout=timeout)
                done.append((r.device, r.seq))
                crash_point("published")
        finally:
            self._confirm(done)

    def _fence(self) -> float:
        """Raise unless this controller holds the lease for longer than the margin (renewed
        first unless that was done within the last second): :class:`LeaseLost` when it
        went to another one. Returns how long a publish may wait for the broker: until the
        margin."""
        if not self._leased:
            raise FleetError("this controller does not hold the fleet's lease: it publishes "
                             "nothing")
        left = self._lease_until - time.monotonic()
        if left < self.lease_ttl - min(1.0, self.lease_ttl / 4):
            self._renew()
            left = self._lease_until - time.monotonic()
        if left <= self.lease_margin:
            raise FleetError(f"the controller lease has {max(left, 0):.1f} s left, under its "
                             f"{self.lease_margin:g} s margin (the database answered that "
                             "slowly): nothing published now")
        return min(10.0, left - self.lease_margin)

    def _confirm(self, done: Sequence[tuple[str, int]]) -> None:
        """Mark records the broker acknowledged (unless they changed meanwhile)."""
        if not done:
            return
        d = device_desired.c
        now = time.time()
        with self.db.begin() as c:
            for dev, seq in done:
                c.execute(device_desired.update().where(
                    (d.fleet == self.topics.fleet) & (d.device == dev) & (d.seq == seq)
                    & d.published.is_(None)).values(published=now))


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
