"""The device agent: keeps a verified model installed and serves it locally.

Run it with ``edge-sdk agent --config agent.toml`` (or ``device_agent --config ...``).
From Python::

    from device_agent import Agent, AgentConfig
    agent = Agent(AgentConfig.from_file("agent.toml"))
    agent.run()          # until SIGTERM

The install pipeline takes deployments from an :class:`ArtifactSource`
(by default the signed-release client over MQTT). With an ``[identity]`` section
(:class:`IdentityConfig`) the device enrols for its broker account through a claim
account and renews it; it serves locally until it has one.
"""

from ._agent import Agent
from ._config import (
    AgentConfig,
    BrokerConfig,
    HealthConfig,
    HttpConfig,
    IdentityConfig,
    LimitsConfig,
    TelemetryConfig,
    TlsConfig,
    TrustConfig,
)
from ._interfaces import ArtifactSource, FetchedArtifact, InstallRequest, ModelChange

__all__ = [
    "Agent",
    "AgentConfig",
    "ArtifactSource",
    "BrokerConfig",
    "FetchedArtifact",
    "HealthConfig",
    "HttpConfig",
    "IdentityConfig",
    "InstallRequest",
    "LimitsConfig",
    "ModelChange",
    "TelemetryConfig",
    "TlsConfig",
    "TrustConfig",
]
