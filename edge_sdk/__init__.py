"""edge-sdk: put ML models on small devices and keep them up to date.

A device app needs only :func:`load`::

    import edge_sdk
    model = edge_sdk.load("artifacts/classifier")
    outputs = model.predict({"input": x})
"""

from ._artifact import Artifact, Manifest, TensorSpec
from ._build import build_artifact
from ._runtime import Predictor, load
from .errors import (
    ArtifactError,
    ConfigError,
    ConversionError,
    EdgeError,
    InputError,
    InstallError,
    ModelLoadError,
    TransportError,
    UsageError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "ArtifactError",
    "ConfigError",
    "ConversionError",
    "EdgeError",
    "InputError",
    "InstallError",
    "Manifest",
    "ModelLoadError",
    "Predictor",
    "TensorSpec",
    "TransportError",
    "UsageError",
    "VerificationError",
    "__version__",
    "build_artifact",
    "load",
]
