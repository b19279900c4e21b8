"""Real enrolment requests for tests of the fleet's record: each made with a fresh EC
P-256 device key (:class:`edge_sdk.identity.DeviceKey`), or again with the key of an
earlier one."""

from __future__ import annotations

from collections.abc import Mapping

from edge_sdk.identity import DeviceKey, EnrolRequest

#: Every key made here, by fingerprint (a test's "same key again").
_KEYS: dict[str, DeviceKey] = {}


def request(device_id: str, batch: str = "b1", *,
            facts: Mapping[str, str] | None = None) -> EnrolRequest:
    """A request of ``device_id`` through ``batch`` with a new key; facts default to
    ``{"arch": "aarch64"}``."""
    key = DeviceKey.generate()
    _KEYS[key.fingerprint] = key
    return EnrolRequest.create(key, device_id, batch,
                               {"arch": "aarch64"} if facts is None else facts)


def again(earlier: EnrolRequest, batch: str | None = None) -> EnrolRequest:
    """A new request with ``earlier``'s key (and id; its batch unless ``batch``)."""
    return EnrolRequest.create(_KEYS[earlier.fingerprint], earlier.device_id,
                               batch or earlier.batch, earlier.facts)
