"""Device identity: the device key, enrolment documents, sealed broker credentials.

Pure: no MQTT and no database here; the agent (:mod:`device_agent`) and the fleet
controller (:mod:`edge_sdk.fleet`) move these documents over the topics of
:class:`~edge_sdk.transport.Topics` (``enrol_request``, ``enrol_answer``,
``cred_request``, ``cred_answer``).

- :class:`DeviceKey`: the device's EC P-256 key, made on the device and never sent
  (``generate``, ``load_or_create(path)``, ``from_pem``, ``public_pem``,
  ``fingerprint``, ``csr(device_id)``, ``sign(data)``, ``open(sealed, device_id=)``);
  :func:`fingerprint_of` names a public key PEM the same way.
- :class:`EnrolRequest` (``create``, ``to_bytes``, ``from_bytes(payload, batch=,
  device_id=)``), :class:`EnrolAnswer` (``to_bytes``, ``from_bytes(payload,
  device_id=)``), :class:`RenewRequest` (``signed``, ``verify``), :class:`RenewHint`
  (renew now: the groups changed): bounded parsing, at most :data:`MAX_REQUEST_BYTES` /
  :data:`MAX_ANSWER_BYTES` / :data:`MAX_HINT_BYTES` bytes.
- :class:`Credentials`: the broker account of a device; :func:`seal` encrypts them to a
  device's public key (ECIES: P-256 ECDH, HKDF-SHA256, AES-256-GCM).
- Names: :func:`claim_username` (``_claim-<batch>``, session k >= 1
  ``_claim<k>-<batch>``), :func:`claim_session` (a device's session of its claim),
  :func:`check_batch`, :func:`check_claim_sessions`, :func:`check_device_id`.
- Errors: :class:`IdentityError` (an :class:`~edge_sdk.errors.EdgeError`), and
  :class:`EnrolmentRefused` for a document that fails a check (one line saying what was
  expected).
"""

from ._credentials import MAX_CREDENTIALS_BYTES, MAX_SEALED_CHARS, Credentials, seal
from ._documents import (
    MAX_ANSWER_BYTES,
    MAX_HINT_BYTES,
    MAX_REQUEST_BYTES,
    STATES,
    EnrolAnswer,
    EnrolRequest,
    RenewHint,
    RenewRequest,
)
from ._errors import EnrolmentRefused, IdentityError
from ._key import DeviceKey
from ._pem import fingerprint_of
from ._words import (
    CLAIM_PREFIX,
    DEFAULT_CLAIM_SESSIONS,
    MAX_BATCH_CHARS,
    MAX_CLAIM_SESSIONS,
    check_batch,
    check_claim_sessions,
    check_device_id,
    claim_session,
    claim_username,
)

__all__ = [
    "CLAIM_PREFIX",
    "DEFAULT_CLAIM_SESSIONS",
    "MAX_ANSWER_BYTES",
    "MAX_BATCH_CHARS",
    "MAX_CLAIM_SESSIONS",
    "MAX_CREDENTIALS_BYTES",
    "MAX_HINT_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_SEALED_CHARS",
    "STATES",
    "Credentials",
    "DeviceKey",
    "EnrolAnswer",
    "EnrolRequest",
    "EnrolmentRefused",
    "IdentityError",
    "RenewHint",
    "RenewRequest",
    "check_batch",
    "check_claim_sessions",
    "check_device_id",
    "claim_session",
    "claim_username",
    "fingerprint_of",
    "seal",
]
