"""Verification failures, one class per attack or refusal (all :class:`VerificationError`).

The transfer-level one (:class:`EndlessDataError`) lives in :mod:`edge_sdk.transport`
and is re-exported from :mod:`edge_sdk.trust`.
"""

from __future__ import annotations

from ..errors import VerificationError


class SignatureError(VerificationError):
    """Metadata is not signed by enough trusted keys (wrong key, threshold not met)."""


class RollbackError(VerificationError):
    """The repository offered metadata older than what this device already trusts."""


class ExpiredError(VerificationError):
    """Signed metadata has expired: the repository is frozen or not refreshed."""


class MixAndMatchError(VerificationError):
    """Metadata files do not belong together (hash/length/version differ from what the
    snapshot or timestamp signed)."""


class TargetHashError(VerificationError):
    """A downloaded file does not match the length and hash the repository signed."""


class RepositoryError(VerificationError):
    """The repository metadata is invalid in some other way (malformed, wrong type...)."""


class TargetMismatchError(VerificationError):
    """The deployment and the release repository disagree about the artifact to install
    (target missing, or a different hash or length)."""


class DeploymentVerificationError(VerificationError):
    """Root of the refusals of a deployment document (not to be confused with
    :class:`~edge_sdk.errors.DeploymentError`: a rollout that did not reach every device)."""


class MalformedDeploymentError(DeploymentVerificationError):
    """The deployment document is not valid JSON of the expected shape."""


class DeploymentSignatureError(DeploymentVerificationError, SignatureError):
    """The deployment is not signed by the trusted deployment key."""


class DeploymentExpiredError(DeploymentVerificationError, ExpiredError):
    """The deployment document has expired."""


class ReplayError(DeploymentVerificationError):
    """The deployment's counter is not newer than the last one accepted (replayed document)."""


class NotForThisDeviceError(DeploymentVerificationError):
    """The deployment names other devices, groups or another fleet."""


class DowngradeError(DeploymentVerificationError):
    """The deployment installs an older version without an explicitly signed rollback."""
