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
  with ``have=[LocalModel(path, sha256)]`` a signed delta from a model
  the device holds is applied instead of the full download, and ``last_download``
  (:class:`Download`) says which was used.
- :func:`load_public_key` for the deployment key file.

Profiling requests travel in the same signed envelope; their documents are
:mod:`edge_sdk.profiling`.

Host-side: :func:`sign_deployment` (operators use
:func:`edge_sdk.release.create_deployment`); the repository and its keys are
:class:`edge_sdk.release.Repository`.

Errors (all :class:`~edge_sdk.errors.VerificationError`): :class:`SignatureError`
(wrong key, threshold not met), :class:`RollbackError`, :class:`ExpiredError`
(freeze), :class:`MixAndMatchError`, :class:`TargetHashError` (tampered bytes),
:class:`TargetMismatchError` (deployment and repository disagree),
:class:`RepositoryError`, and the :class:`DeploymentVerificationError` family. A download
may also raise :class:`edge_sdk.transport.EndlessDataError` (a ``VerificationError``) or
:class:`edge_sdk.transport.SlowRetrievalError` (a
:class:`~edge_sdk.errors.TransportError`: a stall is retried, never refused).
"""

import importlib
from typing import TYPE_CHECKING

from ._deployment import (
    Deployment,
    ModelTarget,
    ShadowSpec,
    sign_deployment,
    verify_deployment,
)
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

if TYPE_CHECKING:
    from ._client import Download, LocalModel, UpdateClient
    from ._keys import load_public_key
    from ._targets import ReleasedTarget

#: Loaded when first used: they import python-tuf, paho and cryptography, which checking a
#: signed document (a deployment, a profiling request, the agent's config) does not need.
_LAZY = {"Download": "._client", "LocalModel": "._client", "UpdateClient": "._client",
         "load_public_key": "._keys", "ReleasedTarget": "._targets"}


def __getattr__(name: str) -> object:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Deployment",
    "DeploymentExpiredError",
    "DeploymentSignatureError",
    "DeploymentVerificationError",
    "DowngradeError",
    "Download",
    "ExpiredError",
    "LocalModel",
    "MalformedDeploymentError",
    "MixAndMatchError",
    "ModelTarget",
    "NotForThisDeviceError",
    "ReleasedTarget",
    "ReplayError",
    "RepositoryError",
    "RollbackError",
    "ShadowSpec",
    "SignatureError",
    "TargetHashError",
    "TargetMismatchError",
    "UpdateClient",
    "load_public_key",
    "sign_deployment",
    "verify_deployment",
]
