"""User-input errors: one clean line on stderr and a documented exit code; tracebacks only for bugs.

Exit codes of `python -m train` (documented in launch/README.md):

  0  trained to train.steps, or stopped by SIGTERM after saving
  1  a bug: anything else, with Python's traceback
  2  config error: a bad key or value, an impossible layout
  3  data error: a missing data path or tokenizer, a record failing data.on_bad_record=error,
     a saved data position that does not match the configured sources
  4  run directory error: run.dir is a file or cannot be created
  5  run directory in use: another live run holds run.dir's lock (the message names it)
  6  checkpoint error: no checkpoint in run.dir can be loaded, or a save ran out of disk space
  7  HF import error: checkpoint.init_from_hf points at weights that cannot be imported

MOEFORGE_DEBUG=1 prints the traceback of a user error too.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from data.errors import DataError
from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.disk_space import DiskFullError
from train.run_lock import RunDirError, RunDirLockedError


class HFInitError(ConfigError):
    """checkpoint.init_from_hf names a directory whose weights cannot be imported."""


# (error class, label, exit code); the first matching class wins, so subclasses come first.
USER_ERRORS: tuple[tuple[type[BaseException], str, int], ...] = (
    (HFInitError, "hf import error", 7),
    (ConfigError, "config error", 2),
    (DataError, "data error", 3),
    (RunDirLockedError, "run directory in use", 5),
    (RunDirError, "run directory error", 4),
    (CheckpointError, "checkpoint error", 6),
    (DiskFullError, "checkpoint error", 6),
)


def classify(e: BaseException) -> tuple[str, int] | None:
    """(label, exit code) of a user error, None for anything else (a bug)."""
    for cls, label, code in USER_ERRORS:
        if isinstance(e, cls):
            return label, code
    return None


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (multi-line messages joined with '; ')."""
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def run_reporting_user_errors(main: Callable[[], int]) -> int:
    """Run `main`; a user error prints `<label>: <message>` (one line) and returns its exit code."""
    try:
        return main()
    except Exception as e:
        found = classify(e)
        if found is None:
            raise  # a bug: the traceback is the report
        label, code = found
        if os.environ.get("MOEFORGE_DEBUG") == "1":
            traceback.print_exc()
        print(f"{label}: {one_line(e)}", file=sys.stderr, flush=True)
        return code
