"""Held-out files: a deterministic share of a source's files, chosen by a hash of each file's path.

`holdout: f` on a source keeps the files whose path hashes below f out of the training stream,
and the same source with the same `holdout` under `eval.sources` reads only those files, so
validation text is never trained on. The hashed key is the path relative to the standard
library's root for ``@python-stdlib`` (the same files are chosen on every machine), else the
path as the source expanded it. Both streams call `split_files`.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from typing import List

from .config import PYTHON_STDLIB


def holdout_key(path: str, source_path: str) -> str:
    """What the hash of `path` (one expanded file of the source `source_path`) is taken over."""
    if source_path == PYTHON_STDLIB:
        return os.path.relpath(path, sysconfig.get_paths()["stdlib"]).replace(os.sep, "/")
    return path


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the file named `key` falls in the held-out share `fraction` (sha256, uniform in [0, 1))."""
    digest = hashlib.sha256(f"moeforge-holdout:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_files(files: List[str], source_path: str, fraction: float, held_out: bool) -> List[str]:
    """The training side (held_out False) or the held-out side of a source's files, order kept."""
    if fraction <= 0:
        return list(files)
    return [f for f in files if is_held_out(holdout_key(f, source_path), fraction) == held_out]
