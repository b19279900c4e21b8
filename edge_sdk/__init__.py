"""edge-sdk: put ML models on small devices and keep them up to date.

A device app needs only :func:`load`::

    import edge_sdk
    model = edge_sdk.load("artifacts/classifier")
    outputs = model.predict({"input": x})

An artifact converted with ``--preprocess image:...`` and ``--postprocess`` answers an
image in its task's terms: ``model.answer("photo.jpg").labels`` (:class:`Label`),
``.boxes`` (:class:`Box`), ``.class_map`` or ``.embedding``.
"""

from ._answers import Answer, Box, Label
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
    "Answer",
    "Artifact",
    "ArtifactError",
    "Box",
    "ConfigError",
    "ConversionError",
    "EdgeError",
    "InputError",
    "InstallError",
    "Label",
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
