"""Host side of releases: the TUF repository and signed deployments.

- :class:`Repository`: ``Repository.init(repo, keydir, thresholds=, expires_days=)``,
  ``Repository(repo)``, ``add_artifact(dir) -> ReleasedTarget``, ``targets()``,
  ``find(name, version=None)``, ``refresh()``, ``rotate_key(role)``,
  ``root_path`` (trusted root for devices), ``deployment_key_path``.
- :func:`create_deployment` → :class:`SignedDeployment` (``.deployment``, ``.document``),
  :func:`publish_deployment` (retained on each ``desired`` topic).
- The responder that serves a repository is :class:`edge_sdk.transport.RepoResponder`.
"""

from ._deploy import (
    SignedDeployment,
    clear_deployment,
    create_deployment,
    deployment_state,
    publish_deployment,
)
from ._repository import ReleasedTarget, Repository, released_target

__all__ = [
    "ReleasedTarget",
    "Repository",
    "SignedDeployment",
    "clear_deployment",
    "create_deployment",
    "deployment_state",
    "publish_deployment",
    "released_target",
]
