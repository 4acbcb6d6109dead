"""Errors in the data a user points the trainer at (as opposed to bugs in the pipeline).

`DataError` is a ValueError, so callers that catch ValueError keep working; the
training CLI turns it into one line and its own exit code (train/user_errors.py).
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: a missing path, a record failing the `error` policy, an unusable
    tokenizer, or a saved stream position that does not match the configured sources."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A configured data file (e.g. data.tokenizer) does not exist."""
