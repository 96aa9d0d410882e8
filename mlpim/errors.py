"""The error types for user mistakes: the CLI prints their message on one line (exit 2).

Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class MlpimError(Exception):
    """A mistake in the config, the command line or the file system that the user can fix."""


class ConfigError(MlpimError, ValueError):
    """A config value that cannot work with this model or dataset."""


class ModelNotFoundError(MlpimError, RuntimeError):
    """Model weights are not on this machine."""
