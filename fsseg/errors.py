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


def user_error(error: BaseException | None) -> FssegError | None:
    """The user error behind ``error`` (MONAI's Compose re-raises a transform's error as a RuntimeError).

    An OSError naming a file (permission denied, disk full, a folder where a file should be) counts as one.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, FssegError):
            return error
        if isinstance(error, OSError) and error.filename:  # unreadable input, unwritable output, full disk
            return FssegError(f"{error.filename}: {error.strerror or error}")
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
