"""Errors that reach the user as one clear line.

Every error names the problem and the fix; the CLI prints ``error: <message>``
and exits with status 2 instead of showing a traceback.
"""


class ProgFedError(Exception):
    """Base class for errors the user can fix (bad config, data or update)."""


class ConfigError(ProgFedError):
    """A configuration key has a value that cannot be used."""


class DataError(ProgFedError):
    """A data file is missing, truncated or in the wrong format."""


class InvalidUpdateError(ProgFedError):
    """A client update does not match the stage, keys or shapes the server expects."""
