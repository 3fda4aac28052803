"""Errors that are the user's to fix, not coati's: bad data, a missing input, flags that cannot work together, an
optional package that is not installed.

Every script's entry point (:func:`coati.cli.run`) turns a :class:`UserError` into one ``error: <message>``
line and exit status 2, without a traceback; any other exception is a bug and keeps its traceback. Each class
also derives from the built-in error it replaced, so library callers keep catching what they caught before.
"""


class UserError(Exception):
    """Base of the errors a command line reports in one line. The message must say what to change."""


class UsageError(UserError, ValueError):
    """A flag value, or a combination of flags, that coati refuses before doing any work."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory named on the command line that is not there."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a requested feature needs; the message names what to install."""


class CheckpointError(UserError, OSError):
    """A checkpoint that cannot be read (damaged on disk) or written (disk full, no permission)."""
