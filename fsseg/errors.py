"""Errors a user can act on: they are printed as one line, without a traceback."""

from __future__ import annotations


class FssegError(Exception):
    """A problem with the user's input or environment, described in one actionable sentence.

    Command-line entry points print ``str(error)`` and exit non-zero instead of showing a traceback.
    """


class DataError(FssegError):
    """A data file or data list is missing, unreadable or inconsistent."""


class DiskFull(DataError):
    """A write failed for want of space (a full disk or quota): every later write would fail too."""


class ConfigError(FssegError):
    """A configuration value is unknown, missing or of the wrong type."""
