"""A driver for gated rollouts in the pure state machine: :class:`GateSim` is
:class:`tests._rollout_sim.Sim` whose devices also answer shadow documents, each with the
result word and figures the test gives it (default: a run that passes the gate)."""

from __future__ import annotations

from typing import Any

from edge_sdk.fleet._machine import Effect, Publish, Report, RolloutSpec, Sign, Signed
from edge_sdk.quality import Gate, ShadowFigures
from tests._rollout_sim import Sim, spec

#: The tests' gate: 100 requests within 10 minutes, agreement at least 0.99.
GATE = Gate.parse("agreement>=0.99 over 100 requests within 10m")


def figures(compared: int = 100, agreed: int | None = None, **kw: Any) -> dict[str, Any]:
    """Figures as a device reports them (``agreed`` defaults to all compared)."""
    return ShadowFigures(compared=compared, agreed=compared if agreed is None else agreed,
                         **kw).to_json()


PASSING = ("shadow_passed", figures())
FAILING = ("shadow_failed", figures(100, 80, worst=0.2, worst_detail="class 3 -> 5"))
THIN = ("shadow_insufficient", figures(12))


def gated(**kw: object) -> RolloutSpec:
    return spec(**{"gate": GATE, **kw})


class GateSim(Sim):
    def __init__(self, spec: RolloutSpec, n: int = 0, **kw: Any) -> None:
        super().__init__(spec, n, **kw)
        #: How each device ends a shadow run: (result word, figures); None: it never
        #: answers.
        self.shadows: dict[str, tuple[str, dict[str, Any] | None] | None] = {}
        self.shadow_docs: dict[str, Sign] = {}  # document -> the Sign it answers

    def _effect(self, fx: Effect) -> None:
        if isinstance(fx, Sign) and fx.shadow:
            self._point()
            self.signs.append(fx)
            self.counter += 1
            doc = f"#{self.counter} shadow {fx.models} + {fx.shadow}"
            self.docs[doc] = (self.counter, False)
            self.shadow_docs[doc] = fx
            self._point()
            self.feed(Signed(fx.devices, self.counter, doc, False, self.now, shadow=True))
            return
        if isinstance(fx, Publish) and fx.document in self.shadow_docs:
            for d in fx.devices:
                self._point()
                if fx.document not in self.inbox[d]:
                    self.sends.append((self.now, d))
                self.inbox[d].append(fx.document)
                self.retained[d] = fx.document
            return
        super()._effect(fx)

    def _answers(self) -> tuple[Report, ...]:
        out = []
        for d, docs in self.inbox.items():
            doc = docs[-1]
            if doc not in self.shadow_docs or (d, doc) in self.answered:
                continue
            said = self.shadows.get(d, PASSING)
            self.answered.add((d, doc))  # the base never answers a shadow document
            if said is None:
                continue
            word, figs = said
            out.append(Report(d, self.docs[doc][0], word, f"{d} said {word}", figs))
        return tuple(out) + super()._answers()

    def shadowed(self, device: str) -> list[Sign]:
        """The shadow documents ``device`` was sent (republished ones again)."""
        return [self.shadow_docs[doc] for doc in self.inbox[device]
                if doc in self.shadow_docs]

    def forward(self, device: str) -> set[int]:
        return {self.docs[doc][0] for doc in self.inbox[device]
                if not self.docs[doc][1] and doc not in self.shadow_docs}
