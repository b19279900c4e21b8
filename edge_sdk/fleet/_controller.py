"""The rollout controller inside ``edge-sdk serve``: its poll loop.

The database is the authority: the operator API (:mod:`._manage`: ``edge-sdk rollout
start|pause|resume|abort``, the page's actions) writes a rollout row or a command row;
the controller polls for them, runs each rollout's state machine (:mod:`._machine`) and
saves its state (:mod:`._store`) before carrying out any effect. The controller holds
the deployment key (it signs each wave) and refuses a key file that its group or others
can read.

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
from collections.abc import Sequence

from .._oneline import one_line
from ..errors import EdgeError
from ..release._deploy import (
    SignedDeployment,
    clear_deployment,
    create_deployment,
    last_document,
)
from ..release._repository import Repository
from ..transport import MqttConnection, Topics
from ..trust._deployment import ShadowSpec
from ..trust._keys import DEPLOYMENT_ROLE
from . import _machine as m
from . import _store as store
from ._members import leave_out_held, members
from ._retained import Held, RetainedDesired, digest
from ._store import DatabaseError, FleetDB, FleetError, FleetUsageError, LeaseLost, Record

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
        #: Rollouts whose record is refused, with why (logged once per reason).
        self._refused: dict[int, str] = {}
        #: (device, rollout) pairs already logged as left out for another rollout's sake.
        self._held_warned: set[tuple[str, int]] = set()
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
            except (FleetError, DatabaseError) as err:
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
            except (EdgeError, DatabaseError) as err:
                log.warning("controller: %s", str(err).splitlines()[0])
                self._states.clear()  # reload from the record next time
            except Exception:
                log.exception("controller poll failed")
                self._states.clear()
            self._stop.wait(self.poll_s)

    def poll(self) -> None:
        if self._leased:
            self._renew()
        ids = store.active_rollouts(self.db, self.topics.fleet)
        self._reconcile(ids)
        for rid in ids:
            try:
                self._poll_one(rid, ids)
            except (LeaseLost, DatabaseError):
                raise
            except EdgeError as err:
                # One rollout whose record this code refuses (a spec stored before a
                # rule was added, a row not written by it) must not stall the others.
                why = one_line(err)
                if self._refused.get(rid) != why:
                    log.warning("rollout %d is not driven: %s", rid, why)
                self._refused[rid] = why
                self._states.pop(rid, None)
            else:
                self._refused.pop(rid, None)
        for rid in [r for r in self._states if r not in ids]:
            del self._states[rid]
        for rid in [r for r in self._refused if r not in ids]:
            del self._refused[rid]

    def _renew(self) -> None:
        t0 = time.monotonic()
        self.db.renew_lease(self.topics.fleet, self.holder, self.lease_ttl)
        self._lease_until = t0 + self.lease_ttl

    def _apply(self, old: m.RolloutState, event: m.Event,
               command_seq: int | None = None) -> m.RolloutState:
        new, effects = m.step(old, event)
        t0 = time.monotonic()
        with self.db.begin() as c:
            if self._leased:  # nothing is saved, so nothing is done, without the lease
                self.db.renew_lease(self.topics.fleet, self.holder, self.lease_ttl, conn=c)
            store.save_state(c, new, old)
            store.save_desired(c, self.topics.fleet, new, old,
                               backfill=isinstance(event, m.Restarted))
            if command_seq is not None:
                store.command_done(c, command_seq)
        if self._leased:
            self._lease_until = t0 + self.lease_ttl
        self._states[new.id] = new
        if new.status == "aborting" and old.status != "aborting":
            crash_point("aborted")
        for fx in effects:
            new = self._effect(new, fx)
        return new

    def _poll_one(self, rid: int, active: Sequence[int]) -> None:
        state = self._states.get(rid)
        if state is None:
            with self.db.read() as c:
                state = store.load_state(c, rid)
            state = self._apply(state, m.Restarted(time.time()))
        with self.db.read() as c:
            cmds = store.pending_commands(c, rid)
        for cmd in cmds:
            event = m.Command(cmd.command, time.time(), cmd.actor)
            try:
                state = self._apply(state, event, command_seq=cmd.seq)
            except m.IllegalEvent as err:  # a row not written by this code: skip it once
                log.warning("%s", err)
                with self.db.begin() as c:
                    store.command_done(c, cmd.seq)
        sel = store.rollout_selector(self.db, rid)
        mem = members(self.db, self.topics.fleet, sel, model=state.model)
        # One desired topic per device: leave out what another active rollout holds. The
        # older ones were ticked first in this poll, so a device that joins the selectors
        # of two goes to the older; the newer takes it once the older lets go of it, if
        # it is running or paused then (the machine takes in late members only then).
        mem = leave_out_held(mem, state, m.holders(self._others(rid, active)),
                             self._held_warned)
        # The registry's progress (``caught_up``): timeouts wait for it. Read before the
        # reports, so that every report received before it is in what they see.
        heard = store.heard_until(self.db, self.topics.fleet)
        revoked = store.revoked_devices(self.db, self.topics.fleet)
        shadowing = [d for d, p in state.devices.items() if p.status == "shadowing"]
        runs = store.shadow_runs(self.db, self.topics.fleet, shadowing) if shadowing else {}
        self._apply(state, m.Tick(time.time(), mem, self._reports(state), heard_until=heard,
                                  revoked=revoked, shadow_runs=runs))

    def _others(self, rid: int, active: Sequence[int]) -> list[m.RolloutState]:
        """The states of the active rollouts but ``rid``: as this controller last saw
        them, or as recorded for the ones it has not loaded yet (newer ones, in its first
        poll) unless their record is refused."""
        out: list[m.RolloutState] = []
        for r in active:
            st = self._states.get(r)
            if st is None and r != rid and r not in self._refused:
                try:
                    with self.db.read() as c:
                        st = store.load_state(c, r)
                except EdgeError:
                    continue  # refused when its own turn comes
            if st is not None and r != rid:
                out.append(st)
        return out

    def _reports(self, state: m.RolloutState) -> list[m.Report]:
        waiting: dict[str, set[int]] = {}
        for d, p in state.devices.items():
            if p.status == "sent" and p.counter is not None:
                waiting.setdefault(d, set()).add(p.counter)
            if p.status == "shadowing" and p.shadow_counter is not None:
                waiting.setdefault(d, set()).add(p.shadow_counter)
            if p.rollback_status == "sent" and p.rollback_counter is not None:
                waiting.setdefault(d, set()).add(p.rollback_counter)
        if not waiting:
            return []
        return store.reports(self.db, self.topics.fleet, waiting)

    def _effect(self, st: m.RolloutState, fx: m.Effect) -> m.RolloutState:
        if isinstance(fx, m.Sign):
            shadow = bool(fx.shadow)
            try:
                if shadow:
                    signed = self._sign_shadow(st, fx)
                else:
                    # An abort's send-back returns devices to what they ran, yanked or not.
                    models, remove = fx.targets(st.model)
                    signed = create_deployment(
                        self.repo, models=models, remove=remove, fleet=self.topics.fleet,
                        devices=fx.devices, rollback=fx.rollback or st.spec.signed_rollback,
                        allow_yanked=fx.rollback)
            except EdgeError as err:
                log.warning("rollout %d: cannot sign for %s: %s", st.id,
                            ", ".join(fx.devices), err)
                return self._apply(st, m.SignFailed(fx.devices, str(err), fx.rollback,
                                                    time.time(), shadow=shadow))
            crash_point("signing")
            return self._apply(st, m.Signed(fx.devices, signed.deployment.counter,
                                            signed.document.decode(), fx.rollback,
                                            time.time(), shadow=shadow))
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

    def _sign_shadow(self, st: m.RolloutState, fx: m.Sign) -> SignedDeployment:
        """A shadow document for ``fx.devices``: they serve ``fx.models`` (what they ran
        before the rollout, yanked or not) and run ``fx.shadow`` beside them, under the
        rollout's gate."""
        gate = st.spec.gate
        if gate is None:  # pragma: no cover - the machine signs shadows for gates only
            raise FleetError(f"rollout {st.id} has no gate to shadow under")
        return create_deployment(
            self.repo, models=fx.models, fleet=self.topics.fleet, devices=fx.devices,
            rollback=st.spec.signed_rollback, allow_yanked=True, shadow=fx.shadow,
            shadow_run=ShadowSpec.for_gate((), gate))

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
        fleet = self.topics.fleet
        if full and self._watching:
            rows = store.desired_records(self.db, fleet)
        elif full:  # nothing to compare with: publish every active rollout's again
            rows = store.desired_records(self.db, fleet, unpublished=True, rollouts=active)
        else:
            rows = store.desired_records(self.db, fleet, unpublished=True, devices=changed)
        self._publish_where_wrong(rows, everything=full and not self._watching)

    def _drive(self, devices: Sequence[str]) -> None:
        """Publish the record of ``devices`` where the broker may not hold it."""
        self._publish_where_wrong(store.desired_records(self.db, self.topics.fleet,
                                                        devices=devices))

    def _publish_where_wrong(self, rows: Sequence[Record], *,
                             everything: bool = False) -> None:
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

    def _newer_deploy(self, r: Record, held: Held) -> bool:
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
        rows = store.desired_documents(self.db, self.topics.fleet, devices)
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
        if done:
            store.confirm_published(self.db, self.topics.fleet, done)


__all__ = ["Controller", "check_key_permissions"]
