"""User-facing error types.

Every error a user can cause (bad input, a missing file, a wrong config value) is raised as a
:class:`StablerepError` subclass with a one-line message that names the input and what was
expected. The CLI prints that line and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class StablerepError(Exception):
    """An error caused by input the user can fix; its message is one line."""


class ConfigError(StablerepError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class InputError(StablerepError, ValueError):
    """An input (file, column, data set) is missing, empty or malformed."""
