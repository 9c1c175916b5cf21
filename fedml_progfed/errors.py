"""Errors that reach the user as one clear line.

Every error names the problem and the fix; the CLI prints ``error: <message>``
and exits with status 2 instead of showing a traceback.

Layers below the configuration do not know YAML section or key names: they
raise :class:`FieldError` naming the *field* (``"batch_size"``,
``"progfed.stages"``), and the configuration layer
(:func:`fedml_progfed.config.explain`) turns it into ``section.key: ...``.
"""


class ProgFedError(Exception):
    """Base class for errors the user can fix (bad config, data or update)."""


class ConfigError(ProgFedError):
    """A configuration key has a value that cannot be used (message already names the key)."""


class FieldError(ConfigError):
    """A configured value a lower layer cannot use.

    Parameters
    ----------
    field
        The configuration field, as the dataclass path: ``"batch_size"`` for a FedML
        key, ``"progfed.stages"`` / ``"profl.em_window"`` for ours.
    problem
        What is wrong and how to fix it, without the key (the config layer adds it).
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class DataError(ProgFedError):
    """A data file is missing, truncated or in the wrong format."""


class InvalidUpdateError(ProgFedError):
    """A message does not match the plan: wrong stage, round, keys, shapes, dtype or values."""


class PeerError(ProgFedError):
    """Another party of a cross-silo job failed, went silent or is gone.

    Parameters
    ----------
    message
        What happened, naming the peer (rank and address).
    peer
        The rank at fault, if one is (it is not sent an abort notice: it started the end).
    """

    def __init__(self, message: str, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class CheckpointError(ProgFedError):
    """A checkpoint that ``--resume`` cannot trust: corrupted, truncated, incomplete or of another run."""


class WriteError(ProgFedError):
    """The run folder could not be written (full disk, no permission, read-only or lost mount)."""
