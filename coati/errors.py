"""Errors that are the user's to fix, not coati's: bad data, a missing input, flags that cannot work together, an
optional package that is not installed.

Every script's entry point (:func:`coati.cli.run`) turns a :class:`UserError` into one ``error: <message>``
line and exit status 2, without a traceback; any other exception is a bug and keeps its traceback. Each class
also derives from the built-in error it replaced, so library callers keep catching what they caught before.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


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


@contextlib.contextmanager
def missing_path(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Loading ``path`` with transformers: an OSError for a path that does not exist becomes a MissingInputError
    naming it (transformers, finding no such directory, complains that it is not a valid Hub id)."""
    try:
        yield
    except OSError as err:
        if Path(path).exists() or isinstance(err, UserError):
            raise
        raise MissingInputError(f"{path}: no such {what} directory (nor a Hugging Face Hub id in the local "
                                "cache)") from err
