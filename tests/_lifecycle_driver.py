"""The driver of the installer's pure state machine, shared by the lifecycle tests: it
feeds events like the Installer and answers LoadModel with ModelLoaded (or ModelUnusable
for the models named broken) and WatchHealth with the health verdict asked for."""

from __future__ import annotations

from typing import Any

from device_agent import InstallRequest, ModelChange
from device_agent._events import (
    Accepted,
    Adopted,
    Effect,
    Event,
    Fetched,
    Healthy,
    Loaded,
    LoadModel,
    ModelLoaded,
    ModelUnusable,
    Report,
    SaveState,
    SmokeTested,
    Unhealthy,
    Verified,
    WatchHealth,
)
from device_agent._lifecycle import Life, Mode, step
from device_agent._state import InstalledState, ModelRecord


class Run:
    """Feeds events like the Installer, recording effects; answers LoadModel/WatchHealth."""

    def __init__(self, life: Life | None = None, *, broken: tuple[ModelRecord, ...] = (),
                 health: str | None = None) -> None:
        self.life = life or Life()
        self.broken = broken
        #: None: healthy; a reason: unhealthy; "stop": the agent stops inside the window.
        self.health = health
        self.effects: list[Effect] = []

    def feed(self, *events: Event) -> Run:
        for event in events:
            queue = [event]
            while queue:
                self.life, effects = step(self.life, queue.pop(0))
                self.effects += effects
                for e in effects:
                    if isinstance(e, LoadModel):
                        queue.append(ModelUnusable(e.record, "broken") if e.record in self.broken
                                     else ModelLoaded(e.record))
                    elif isinstance(e, WatchHealth) and self.health != "stop":
                        queue.append(Healthy() if self.health is None else Unhealthy(self.health))
        return self

    def reports(self, start: int = 0) -> list[str]:
        """The kinds of the reports among the effects from ``start`` on."""
        return [e.kind for e in self.effects[start:] if isinstance(e, Report)]

    def saved(self) -> InstalledState | None:
        states = [e.state for e in self.effects if isinstance(e, SaveState)]
        return states[-1] if states else None


A1 = ModelRecord("det-1-aaaaaaaaaaaa", "det", "1", "1" * 64, "s1")
A2 = ModelRecord("det-2-bbbbbbbbbbbb", "det", "2", "2" * 64, "s3")
B1 = ModelRecord("rec-1-cccccccccccc", "rec", "1", "3" * 64, "s2")
B2 = ModelRecord("rec-2-dddddddddddd", "rec", "2", "4" * 64, "s3")


def set_dep(counter: int, *arts: ModelRecord, remove: tuple[str, ...] = (),
            groups: tuple[str, ...] = (), length: int | None = None) -> InstallRequest:
    return InstallRequest(f"s{counter}", counter, remove=remove, groups=groups, models=tuple(
        ModelChange(a.name, a.version, a.sha256, length) for a in arts))


def install_set(run: Run, d: InstallRequest, *arts: ModelRecord, scope: str = "device",
                **kw: Any) -> Run:
    run.feed(Accepted(d, scope=scope, **kw))
    if run.life.mode is not Mode.INSTALLING:
        return run
    for a in arts:
        run.feed(Fetched(), Verified(), Adopted(a))
    return run.feed(*(Loaded() for _ in arts), SmokeTested())
