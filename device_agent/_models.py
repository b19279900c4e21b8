"""The models this process holds open: a stored model opened into a :class:`Served`,
re-verified and smoke-tested with its sample; kept by record id (those served, those being
installed and, in a trial, the versions they replaced, for a quick rollback and to tell a
client's bad request from the new model's fault). A model nothing serves is let go, and
its memory with it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from edge_sdk._internal import load_npz, synthetic_inputs
from edge_sdk.errors import EdgeError

from ._config import AgentConfig
from ._interfaces import ModelLoader
from ._serving import Served, SmokeTestError, Trial, smoke_test
from ._state import ModelRecord, StateStore

log = logging.getLogger("device_agent")


class LoadedModels:
    def __init__(self, config: AgentConfig, store: StateStore, open_model: ModelLoader) -> None:
        self.config = config
        self.store = store
        self._open_model = open_model
        self._by_id: dict[str, Served] = {}

    def get(self, record: ModelRecord) -> Served | None:
        return self._by_id.get(record.id)

    def load(self, record: ModelRecord, *, smoke: bool = True,
             verify_hash: bool = True) -> Served:
        """Open (and, with ``smoke``, smoke-test) the stored model, and keep it. Its hash
        is checked again unless ``verify_hash`` is False (see
        :meth:`StateStore.open_model <device_agent._state.StateStore.open_model>`)."""
        art = self.store.open_model(record, verify_hash=verify_hash)
        threads = self.config.threads or None
        predictor = self._open_model(art.model_path, threads=threads, manifest=art.manifest)
        served = Served(predictor, record)
        if smoke:
            self.smoke(served)
        self._by_id[record.id] = served
        return served

    def keep(self, ids: Iterable[str]) -> bool:
        """Let go of every model but these (a request still running on one keeps it until
        it answers); True when one was let go."""
        keep = set(ids)
        before = len(self._by_id)
        self._by_id = {k: v for k, v in self._by_id.items() if k in keep}
        return len(self._by_id) < before

    def __len__(self) -> int:
        return len(self._by_id)

    def smoke(self, served: Served) -> None:
        try:
            inputs = self.sample(served)
        except (EdgeError, OSError, ValueError) as err:
            raise SmokeTestError(f"cannot read the sample: {err}") from err
        smoke_test(served, inputs, warmup=self.config.limits.warmup_runs)

    def sample(self, served: Served) -> Mapping[str, Any]:
        """The inputs ``served`` is tested with: its artifact's sample, else synthetic."""
        art_dir = self.store.model_dir(served.record)
        manifest = served.predictor.manifest
        if manifest is not None and manifest.sample:
            data = load_npz(art_dir / manifest.sample)
            names = [s.name for s in served.predictor.inputs]
            missing = [n for n in names if n not in data]
            if missing:
                raise SmokeTestError(f"sample file lacks input(s) {', '.join(missing)}")
            return {n: data[n] for n in names}
        return synthetic_inputs(served.predictor.inputs)

    def start_trial(self, served: Served, previous: ModelRecord | None) -> None:
        """Keep the version ``served`` replaced at hand for its health window, loading it
        when a restart left it on disk only: a request both fail on is the client's."""
        if served.trial is not None or previous is None:
            return
        old = self.get(previous)
        if old is None:
            try:
                old = self.load(previous)
            except (EdgeError, SmokeTestError, OSError) as err:
                log.warning("previous model %s cannot be loaded to compare failed requests "
                            "with (none is counted against %s): %s", previous.label(),
                            served.record.label(), err)
                return
        served.trial = Trial(old, self.config.health)

    def end_trial(self, served: Served) -> None:
        trial, served.trial = served.trial, None
        if trial is not None:
            trial.close()
        if served.health.excused:
            log.info("%d failed request(s) in the health window of %s were not counted "
                     "against it (see edge_agent_trial_failures)", served.health.excused,
                     served.record.label())
