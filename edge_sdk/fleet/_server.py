"""What ``edge-sdk serve`` runs for a fleet, as one object: the device registry, the
rollout controller and (optionally) the fleet page, over one database, one release
repository and one MQTT connection. The chunk responder is not part of it: serve runs
one beside it on the same connection, or alone (``--only responder``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import EdgeError
from ..quality import DriftConfig
from ..release._repository import Repository
from ..transport import MqttConnection
from ._controller import Controller
from ._drift import DriftJudge, ReleaseReferences
from ._enroller import Enroller, IdentityConfig, broker_admin
from ._ingest import RegistryConfig
from ._registry import Registry
from ._store import FleetDB, LeaseHeld
from ._web import WebConfig, WebServer

log = logging.getLogger("edge_sdk.fleet.server")


class FleetServer:
    """The registry, the controller and the page of the connection's fleet.

    ``with FleetServer(db, repo, conn, web=WebConfig(port=8700)) as server:`` starts them
    (taking the fleet's controller lease first: :class:`LeaseHeld` while another
    controller holds it; :meth:`wait_for_lease` waits for it instead) and stops them on
    exit, the controller first. ``registry`` (:class:`RegistryConfig`): the registry's
    limits; ``web``: serve the fleet page (None: no page); ``poll_s``, ``lease_ttl``: see
    :class:`Controller`; ``identity`` (:class:`IdentityConfig`): run the :class:`Enroller`
    too (device enrolment and credentials, through the broker's dynamic security plugin
    on the same connection; None: off); ``drift`` (:class:`DriftConfig`): when a device's
    inputs count as drifting. Raises :class:`FleetError` for a deployment key others can
    read."""

    def __init__(self, db: FleetDB, repository: Repository, connection: MqttConnection, *,
                 registry: RegistryConfig | None = None, web: WebConfig | None = None,
                 poll_s: float = 0.5, lease_ttl: float = 15.0,
                 identity: IdentityConfig | None = None,
                 drift: DriftConfig | None = None) -> None:
        self.db = db
        self.repository = repository
        self.fleet = connection.config.fleet
        # Drift is judged against the reference of the version each device serves, read
        # from the repository's signed targets (the manifest rides there).
        self.registry = Registry(connection, db, config=registry, drift=DriftJudge(
            drift, ReleaseReferences(repository)))
        self.controller = Controller(db, repository, connection, poll_s=poll_s,
                                     lease_ttl=lease_ttl)
        self._web_config = web
        #: The enroller (with ``identity``), else None.
        self.enroller: Enroller | None = None
        if identity is not None:
            admin = broker_admin(connection, fleet=self.fleet, timeout=identity.answer_wait_s)
            self.enroller = Enroller(db, connection, admin, fleet=self.fleet,
                                     config=identity)
        #: The fleet page once started (``web.url``), else None.
        self.web: WebServer | None = None

    def wait_for_lease(self, stop: threading.Event,
                       say: Callable[[str], None] | None = None) -> bool:
        """Take the fleet's controller lease, waiting while another controller holds it
        (``say`` is told why once). False when ``stop`` is set while waiting."""
        said = False
        while True:
            try:
                self.controller.acquire()
                return True
            except LeaseHeld as err:
                if not said:
                    (say or log.warning)(f"waiting: {err}")
                    said = True
            if stop.wait(min(2.0, self.controller.lease_ttl / 4)):
                return False

    def start(self) -> FleetServer:
        """Bind the page (:class:`FleetError` when its address cannot be), then start the
        registry, the page and the controller."""
        if self._web_config is not None and self.web is None:
            self.web = WebServer(self.db, fleet=self.fleet, config=self._web_config,
                                 warnings=self._expiry_warnings, yanked=self._yanked)
        self.registry.start()
        if self.web is not None:
            self.web.start()
        self.controller.start()
        if self.enroller is not None:  # only while this server holds the fleet's lease
            self.enroller.start()
        return self

    def stop(self) -> None:
        """Stop the enroller and the controller (giving its lease up), then the page and
        the registry."""
        if self.enroller is not None:
            self.enroller.stop()
            self.enroller.admin.close()
        self.controller.stop()
        if self.web is not None:
            self.web.stop()
        self.registry.stop()

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """False once the controller stopped on its own (:attr:`lost`)."""
        return self.controller.running

    @property
    def lost(self) -> str | None:
        """Why the controller stopped on its own (its lease went to another), else None."""
        return self.controller.lost

    def _expiry_warnings(self) -> list[dict[str, Any]]:
        """The page's ``/api/warnings``: roles expiring within a day with no online key."""
        from ..release import expiry_warnings

        try:
            return [w.to_json() for w in expiry_warnings(self.repository)]
        except EdgeError as err:
            return [{"message": f"cannot read the release metadata: {err}"}]

    def _yanked(self) -> Mapping[tuple[str, str], str | None]:
        return {(t.name, t.version): t.yank_reason for t in self.repository.targets()
                if t.yanked}


__all__ = ["FleetServer"]
