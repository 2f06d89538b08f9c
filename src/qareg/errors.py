"""Exceptions for bad user input: the CLI turns any `QaregError` into exit code 2."""


class QaregError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class ConfigError(QaregError, ValueError):
    """A bad argument or configuration value; the message names it and what is allowed."""


class DataError(QaregError):
    """Missing or malformed data files; the message names the folder and the files expected."""
