"""The fleet's errors (below :class:`~edge_sdk.errors.EdgeError`): apart from the store
that raises most of them, so that the state machine can raise them too without
importing the database."""

from __future__ import annotations

from ..errors import EdgeError


class FleetError(EdgeError):
    """The fleet database cannot be reached or used, or a fleet request is invalid."""


class FleetUsageError(FleetError):
    """A fleet command was asked something it cannot do (unknown rollout, finished one)."""

    exit_code = 2


class LeaseHeld(FleetError):
    """Another controller holds the fleet's lease (the message names it and the expiry)."""


class LeaseLost(FleetError):
    """This controller's lease was taken over (it had expired): it must stop controlling."""


__all__ = ["FleetError", "FleetUsageError", "LeaseHeld", "LeaseLost"]
