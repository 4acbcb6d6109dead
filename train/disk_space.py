"""Disk space and checkpoint saves: a save that fails on a full filesystem says so, and cleans up.

A full disk shows up in many shapes (OSError ENOSPC from a JSON write, a RuntimeError
"unexpected pos" from torch's stream writer, either wrapped in DCP's CheckpointException
per rank), so the diagnosis does not rely on the exception alone: a failed save is a
disk-full one when ENOSPC appears anywhere in it, or when the filesystem, with the partial
checkpoint removed, has less room than the save needs.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.api import CheckpointException


class DiskFullError(RuntimeError):
    """A checkpoint save ran out of space; the message names the directory, bytes needed and free."""


def state_bytes(state_dict: dict[str, Any]) -> int:
    """Bytes of the tensors this rank writes for `state_dict` (DTensors: the local shard)."""
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(state_dict)
    return total


def free_bytes(directory: Path) -> int:
    """Bytes available to this user on the filesystem of `directory` (or of its nearest existing parent)."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _mentions_enospc(e: BaseException, seen: set[int]) -> bool:
    if id(e) in seen:
        return False
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
        return True
    inner = list(getattr(e, "failures", {}).values())  # DCP's CheckpointException: rank -> (error, traceback)
    inner = [f[0] if isinstance(f, tuple) else f for f in inner] + [e.__cause__, e.__context__]
    return any(isinstance(x, BaseException) and _mentions_enospc(x, seen) for x in inner)


@contextlib.contextmanager
def disk_full_reported(directory: Path, tmp: Path, needed: int, remove_tmp: bool) -> Iterator[None]:
    """Run a checkpoint write into `tmp` (under `directory`); if it fails on a full disk, remove
    the partial `tmp` (when `remove_tmp`: the main rank) and raise DiskFullError instead."""
    try:
        yield
    except (Exception, CheckpointException) as e:  # the latter: BaseException
        if remove_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        free = free_bytes(directory)
        if _mentions_enospc(e, set()) or free < needed:
            raise DiskFullError(
                f"checkpoint save to {directory}: no space left on device ({needed} bytes needed for this "
                f"rank's shards, {free} bytes free); partial {tmp.name} removed, earlier checkpoints untouched; "
                "free space or set run.dir on a larger filesystem") from None
        raise
