"""Exceptions that the CLI turns into a one-line message and a non-zero exit.

Every error a user can cause with bad input (a config value, a data root, a file)
derives from :class:`AblError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AblError(Exception):
    """Base of every user-facing error: the message is the whole story."""


class ConfigError(AblError):
    """An experiment config names an unknown key, has a wrong type or an invalid value."""


class UnknownComponentError(ConfigError):
    """A registry was asked for a name it does not hold."""


class DataError(AblError):
    """A dataset root, archive, image or label file is missing, corrupt or malformed."""


class DivergenceError(AblError):
    """Training produced a non-finite loss; the run is stopped and not recorded as a result."""


class StoreError(AblError):
    """The results store is missing, unreadable or does not hold the requested run."""
