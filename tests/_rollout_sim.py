"""A driver for the rollout's pure state machine: no database, no broker, no key.

:class:`Sim` plays the controller's part as ``Controller`` does it — each step's state is
"saved" before its effects are carried out; a Sign is answered with a Signed carrying the
repository's next counter; a Publish lands on the named devices — and the devices' part:
a device answers the document it was sent on the next tick. :func:`spec` is a
:class:`RolloutSpec` with the tests' defaults.
"""

from __future__ import annotations

from collections import defaultdict

from edge_sdk.fleet._machine import (
    Command,
    Effect,
    Event,
    Member,
    Publish,
    Report,
    Restarted,
    RolloutSpec,
    RolloutState,
    Sign,
    Signed,
    Tick,
    desired,
    step,
)


class Crash(Exception):
    """The controller died at this point (kill -9): what was saved stays, the rest is lost."""


class Sim:
    """One rollout of adder 2 to devices serving adder 1, on a fake clock."""

    def __init__(self, spec: RolloutSpec, n: int = 0, *, devices: tuple[str, ...] = (),
                 results: dict[str, str] | None = None, crash_at: int | None = None) -> None:
        self.state = RolloutState(1, "adder", "2", spec)
        self.saved = self.state
        self.now = 1000.0
        self.members = {d: Member(True, "adder", "1")
                        for d in devices or tuple(f"d{i:02d}" for i in range(n))}
        #: How each device answers a forward deployment (default: committed).
        self.results = results or {}
        #: Devices an operator revoked (the controller reads them from the record).
        self.revoked: set[str] = set()
        self.counter = 100  # the repository's deployment counter
        self.docs: dict[str, tuple[int, bool]] = {}  # document -> (counter, rollback)
        #: Every document each device was sent, in order (republished ones again).
        self.inbox: dict[str, list[str]] = defaultdict(list)
        self.answered: set[tuple[str, str]] = set()
        self.cleared: list[str] = []
        #: What the broker retains on each device's desired topic (None: cleared).
        self.retained: dict[str, str | None] = {}
        #: Abort (as the operator) once wave 2 has been sent and not yet answered.
        self.abort_in_wave_2 = False
        self.signs: list[Sign] = []
        self.sends: list[tuple[float, str]] = []  # (time, device) of first deployments
        #: Crash when the controller reaches its crash_at-th point (None: never).
        self.crash_at = crash_at
        self.points = 0

    # -- the controller's part -------------------------------------------------------

    def feed(self, event: Event) -> Sim:
        self.state, effects = step(self.state, event)
        self.saved = self.state  # saved before any effect is carried out
        for fx in effects:
            self._effect(fx)
        return self

    def _point(self) -> None:
        self.points += 1
        if self.points == self.crash_at:
            raise Crash

    def _effect(self, fx: Effect) -> None:
        if isinstance(fx, Sign):
            self._point()  # before signing
            self.signs.append(fx)
            self.counter += 1
            doc = f"#{self.counter} adder {fx.version}" + (" rollback" if fx.rollback else "")
            self.docs[doc] = (self.counter, fx.rollback)
            self._point()  # signed (the counter is used) but not saved
            self.feed(Signed(fx.devices, self.counter, doc, fx.rollback, self.now))
        elif isinstance(fx, Publish):
            for d in fx.devices:
                self._point()
                if not self.docs[fx.document][1] and fx.document not in self.inbox[d]:
                    self.sends.append((self.now, d))
                self.inbox[d].append(fx.document)
                self.retained[d] = fx.document
        else:
            self._point()
            self.cleared.append(fx.device)
            self.retained[fx.device] = None

    def restart(self) -> Sim:
        """A new controller process: it loads what was saved and says so."""
        self.state = self.saved
        return self.feed(Restarted(self.now))

    def tick(self, dt: float = 1.0, *, answer: bool = True) -> Sim:
        self.now += dt
        return self.feed(Tick(self.now, dict(self.members), self._answers() if answer else (),
                              revoked=frozenset(self.revoked)))

    def _answers(self) -> tuple[Report, ...]:
        out = []
        for d, docs in self.inbox.items():
            doc = docs[-1]
            if (d, doc) in self.answered:
                continue
            self.answered.add((d, doc))
            counter, rollback = self.docs[doc]
            result = "committed" if rollback else self.results.get(d, "committed")
            if result != "silent":
                out.append(Report(d, counter, result, None if result == "committed"
                                  else f"{d} said {result}"))
        return tuple(out)

    def command(self, name: str) -> Sim:
        return self.feed(Command(name, self.now, "alice"))

    def run(self, limit: int = 500, *, approve: bool = True) -> Sim:
        """Tick until the rollout is over; resume each time it waits for approval."""
        for _ in range(limit):
            if self.state.status in ("completed", "aborted"):
                return self
            if approve and self.state.held:
                self.command("resume")
            if self.abort_in_wave_2 and self.state.status == "running" and any(
                    p.wave == 2 and p.status == "sent" for p in self.state.devices.values()):
                self.command("abort")
            self.tick()
        raise AssertionError(f"rollout never finished: {self.state}")

    # -- what happened ---------------------------------------------------------------

    def status(self, wave: int | None = None) -> dict[str, str]:
        return {d: p.status for d, p in sorted(self.state.devices.items())
                if wave is None or p.wave == wave}

    def waves(self) -> list[list[str]]:
        out: dict[int, list[str]] = defaultdict(list)
        for d, p in sorted(self.state.devices.items()):
            out[p.wave].append(d)
        return [out[w] for w in sorted(out)]

    def forward(self, device: str) -> set[int]:
        return {self.docs[doc][0] for doc in self.inbox[device] if not self.docs[doc][1]}

    def rollbacks(self, device: str) -> set[int]:
        return {self.docs[doc][0] for doc in self.inbox[device] if self.docs[doc][1]}

    def wanted(self) -> dict[str, str | None]:
        """What the saved state says each device's retained desired topic must hold."""
        return {d: w.document for d in self.saved.devices
                if (w := desired(self.saved, d)) is not None}


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {"waves": ("1", "50%", "100%"), "wave_timeout": 60.0}
    return RolloutSpec(**{**base, **kw})  # type: ignore[arg-type]
