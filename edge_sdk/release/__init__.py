"""Host side of releases: the TUF repository and signed deployments.

- :class:`Repository`: ``Repository.init(repo, keydir, thresholds=, expires=)``,
  ``Repository(repo)``, ``add_artifact(dir, delta_bases=2) -> ReleasedTarget`` (with
  deltas from earlier versions, see :mod:`edge_sdk.delta`), ``targets()``,
  ``find(name, version=None)``, ``refresh()``, ``rotate_key(role)``,
  ``root_path`` (trusted root for devices), ``deployment_key_path``.
- :func:`create_deployment` → :class:`SignedDeployment` (``.deployment``, ``.document``),
  :func:`publish_deployment` (retained on each ``desired`` topic).
- :func:`fleet_status` (every device's retained state as :class:`DeviceStatus`, its
  models as :class:`ModelStatus`, its last results as :class:`UpdateResult`),
  :class:`DeploymentWatch` (subscribe, publish, then ``wait()`` → :class:`Outcome` per
  device), :func:`require_success` (raises :class:`~edge_sdk.errors.DeploymentError`),
  :func:`describe_transfer` (one line for a device's download progress).
- :func:`rollout` (waves, abort, rollback; :class:`RolloutConfig` → :class:`RolloutResult`),
  :func:`plan_waves`.
- :func:`profile_on_devices` (``convert --profile-on``, ``bench --on``): candidates as
  ``profiling/`` targets, a signed request per device, the devices' figures back
  (:class:`ProfileConfig`; a silent or refusing device is a :class:`ProfilingError`);
  :class:`RepositoryProfiler` is that as an :class:`edge_sdk.profiling.DeviceProfiler`.
- :func:`parse_duration` (``2m``, ``12h``, ``7d``), :func:`refresh_due` (half the
  lifetime passed), :class:`FreshnessKeeper` (serve re-signs the due roles whose keys
  are online), :func:`expiry_warnings` (roles expiring within a day with no online key).
- The responder that serves a repository is :class:`edge_sdk.transport.RepoResponder`.
"""

from ..trust._targets import ReleasedTarget, released_target
from ._deploy import (
    DEPLOYMENT_EXPIRES_DAYS,
    SignedDeployment,
    clear_deployment,
    create_deployment,
    deployment_state,
    previous_versions,
    publish_deployment,
)
from ._durations import format_duration, parse_duration, refresh_due
from ._freshness import ExpiryWarning, FreshnessKeeper, describe_lifetimes, expiry_warnings
from ._profile import ProfileConfig, ProfilingError, RepositoryProfiler, profile_on_devices
from ._repository import DEFAULT_DELTA_BASES, ROLE_NAMES, Repository
from ._rollout import RolloutConfig, RolloutResult, plan_waves, rollout
from ._watch import (
    DeploymentWatch,
    DeviceStatus,
    ModelStatus,
    Outcome,
    UpdateResult,
    describe_transfer,
    fleet_status,
    require_success,
)

__all__ = [
    "DEFAULT_DELTA_BASES",
    "DEPLOYMENT_EXPIRES_DAYS",
    "ROLE_NAMES",
    "DeploymentWatch",
    "DeviceStatus",
    "ExpiryWarning",
    "FreshnessKeeper",
    "ModelStatus",
    "Outcome",
    "ProfileConfig",
    "ProfilingError",
    "ReleasedTarget",
    "Repository",
    "RepositoryProfiler",
    "RolloutConfig",
    "RolloutResult",
    "SignedDeployment",
    "UpdateResult",
    "clear_deployment",
    "create_deployment",
    "deployment_state",
    "describe_lifetimes",
    "describe_transfer",
    "expiry_warnings",
    "fleet_status",
    "format_duration",
    "parse_duration",
    "plan_waves",
    "previous_versions",
    "profile_on_devices",
    "publish_deployment",
    "refresh_due",
    "released_target",
    "require_success",
    "rollout",
]
