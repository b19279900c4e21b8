"""Trust: signed releases (python-tuf) and signed deployments, verified on the device.

Device-side API (used by the agent):

- :func:`verify_deployment(payload, key, device_id=, groups=, fleet=, last_counter=,
  installed=(model, version)) <verify_deployment>` → :class:`Deployment` or a
  :class:`DeploymentVerificationError` subclass (bad signature, expired, replayed counter,
  not for this device, unsigned downgrade, malformed).
- :class:`UpdateClient` (trusted root bytes, metadata dir, partial dir, an
  :class:`~edge_sdk.transport.MqttConnection`, device id, a
  :class:`~edge_sdk.transport.FetchConfig`; or any
  :class:`~edge_sdk.transport.RepositoryFetcher` as ``fetcher``): ``fetch(deployment, dest_dir)``,
  ``fetch_release(name, dest_dir, version=)``, ``releases()`` → :class:`ReleasedTarget`;
  with ``have=[LocalModel(path, sha256)]`` a signed delta (:class:`DeltaRef`) from a model
  the device holds is applied instead of the full download, and ``last_download``
  (:class:`Download`) says which was used.
- :func:`load_public_key` / :func:`parse_public_key` for the deployment key file.

Profiling requests travel in the same signed envelope; their documents are
:mod:`edge_sdk.profiling`.

Host-side: :func:`sign_deployment`, :class:`KeyStore`; the repository itself is
:class:`edge_sdk.release.Repository`.

Errors (all :class:`~edge_sdk.errors.VerificationError`): :class:`SignatureError`
(wrong key, threshold not met), :class:`RollbackError`, :class:`ExpiredError`
(freeze), :class:`MixAndMatchError`, :class:`TargetHashError` (tampered bytes),
:class:`EndlessDataError`, :class:`TargetMismatchError` (deployment and repository disagree),
:class:`RepositoryError`, and the :class:`DeploymentVerificationError` family.
:class:`SlowRetrievalError` (re-exported from :mod:`edge_sdk.transport`) is a
:class:`~edge_sdk.errors.TransportError` instead: a stall is retried, never refused.
"""

from ..transport._errors import EndlessDataError, SlowRetrievalError
from ._client import Download, LocalModel, UpdateClient, tuf_error
from ._deployment import Deployment, compare_versions, sign_deployment, verify_deployment
from ._errors import (
    DeploymentExpiredError,
    DeploymentSignatureError,
    DeploymentVerificationError,
    DowngradeError,
    ExpiredError,
    MalformedDeploymentError,
    MixAndMatchError,
    NotForThisDeviceError,
    ReplayError,
    RepositoryError,
    RollbackError,
    SignatureError,
    TargetHashError,
    TargetMismatchError,
)
from ._keys import KeyStore, load_public_key, parse_public_key, public_key_bytes
from ._targets import DeltaRef, ReleasedTarget, released_target

__all__ = [
    "DeltaRef",
    "Deployment",
    "DeploymentExpiredError",
    "DeploymentSignatureError",
    "DeploymentVerificationError",
    "DowngradeError",
    "Download",
    "EndlessDataError",
    "ExpiredError",
    "KeyStore",
    "LocalModel",
    "MalformedDeploymentError",
    "MixAndMatchError",
    "NotForThisDeviceError",
    "ReleasedTarget",
    "ReplayError",
    "RepositoryError",
    "RollbackError",
    "SignatureError",
    "SlowRetrievalError",
    "TargetHashError",
    "TargetMismatchError",
    "UpdateClient",
    "compare_versions",
    "load_public_key",
    "parse_public_key",
    "public_key_bytes",
    "released_target",
    "sign_deployment",
    "tuf_error",
    "verify_deployment",
]
