"""Exceptions and warnings of qareg: a leaf module that imports nothing of the package.

Every `QaregError` is caused by user input rather than by a bug; the CLI turns it into a
message and exit code 2 (1 for `TrainingDiverged`).
"""


class QaregError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class ConfigError(QaregError, ValueError):
    """A bad argument or configuration value; the message names it and what is allowed."""


class DataError(QaregError):
    """Missing or malformed data files; the message names the folder and the files expected."""


class NotPreparedError(QaregError):
    """A method or function needs a model prepared for it (codebooks, quantizers, hooks)
    and got one without; the message names what to call first."""


class TrainingDiverged(QaregError):
    """The loss or the weights became NaN or infinite."""


class QaregWarning(UserWarning):
    """Something worth knowing that does not stop the work (a fallback, a skipped step)."""
