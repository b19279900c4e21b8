"""Exception roots, one per domain.

The CLI catches :class:`EdgeError` once, prints ``str(err)`` on one line and
exits non-zero. Every message must therefore be a complete diagnosis on its
own: what was expected, what was found, and where.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Root of every error edge-sdk raises on purpose."""

    exit_code = 1


class ArtifactError(EdgeError):
    """An artifact directory or its manifest is missing, malformed or does not match its model."""


class ModelLoadError(EdgeError):
    """A runtime could not load a model file (corrupt, unsupported, runtime missing)."""


class InputError(EdgeError, ValueError):
    """Inputs given to a predictor do not match its signature."""

    exit_code = 2


class UsageError(EdgeError):
    """A command was asked something it cannot do (bad file kind, bad option combination)."""

    exit_code = 2


class MissingFileError(UsageError, FileNotFoundError):
    """A file the caller named does not exist. Also a :class:`FileNotFoundError`, as it
    was before it had a place in this tree."""


class ConversionError(EdgeError):
    """A model could not be converted, or the converted model failed verification."""


class VerificationError(EdgeError):
    """Signed metadata, a deployment or downloaded bytes failed verification."""


class TransportError(EdgeError):
    """The broker or the repository responder could not be reached or did not answer in time."""


class DeploymentError(EdgeError):
    """A deployment did not reach every targeted device: failed, rolled back, refused, or
    no answer in time."""

    exit_code = 3


class InstallError(EdgeError):
    """The device agent could not install, swap in or keep a model."""


class ConfigError(EdgeError):
    """A configuration file or value is invalid."""

    exit_code = 2
