"""The one error type for user mistakes: the CLI prints its message on one line (exit 2).

Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class MlpimError(Exception):
    """A mistake in the config, the command line or the file system that the user can fix."""
