"""Exceptions that carry a message meant for the user.

The CLI prints a ``BiogenError`` as one clear message (what was received, what was
expected, how to fix it) instead of a traceback and exits with code 2.
"""


class BiogenError(Exception):
    """An error the user can fix: bad configuration, bad input, wrong directory."""

    exit_code = 2


class ConfigError(BiogenError):
    """A configuration value is invalid (names the key and the valid choices)."""


class InputError(BiogenError):
    """An input file cannot be used as a whole (missing, wrong format, missing column)."""


class LibraryError(BiogenError):
    """A library directory is missing, incompatible or in use."""


class CorruptLibraryError(LibraryError):
    """A library's files do not match its manifest (``library verify`` exits 1)."""

    exit_code = 1
