"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout of RUN_DIR/checkpoints/:
  step_00000100/            one complete checkpoint
    .metadata, *.distcp     DCP shards: model, optimizer, RNG
    meta.json               step, tokens seen, counters, the resolved config
    rank{r}.json            per-rank JSON: data-pipeline position and RNG state
    COMPLETE                marker written last; a directory without it is never loaded
A checkpoint is written to `step_N.tmp` and published by an atomic rename. Loading
never unpickles arbitrary objects: DCP metadata is read with an allow-list
unpickler, and non-tensor values go through torch.load(weights_only=True) or JSON.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from parallel.checkpointing import CheckpointState

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the path and the cause."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: DCP's own dataclasses, torch dtypes/sizes and paths."""

    _MODULES = ("torch.distributed.checkpoint.",)
    _ALLOWED = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self._MODULES) or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata load refuses anything but DCP's own types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing DCP metadata") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable DCP metadata ({e})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of published checkpoints with their marker, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(
    root: Path,
    step: int,
    state: CheckpointState,
    meta: dict[str, Any],
    rank_state: dict[str, Any],
    rank: int,
    is_main: bool,
    barrier: Callable[[], None],
    keep_last: int,
) -> Path:
    """Write a checkpoint for `step` (every rank calls this) and publish it atomically.

    `rank_state` (this rank's data position and RNG, JSON) goes to rank{r}.json.
    """
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(state.state_dict(), checkpoint_id=str(tmp))
    _write_json(tmp / f"rank{rank}.json", rank_state)
    barrier()
    if is_main:
        _write_json(tmp / "meta.json", meta)
        (tmp / MARKER).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, state: CheckpointState, rank: int) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Load model and optimizer in place; return (meta, this rank's saved JSON state or None).

    A rank that did not exist when the checkpoint was saved (a larger world) gets None.
    """
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    meta = _read_json(path / "meta.json")
    rank_file = path / f"rank{rank}.json"
    rank_state = _read_json(rank_file) if rank_file.is_file() else None
    to_fill = state.state_dict()
    try:
        dcp.load(to_fill, storage_reader=SafeFileSystemReader(str(path)))
    except CheckpointError:
        raise
    except Exception as e:  # DCP raises CheckpointException / RuntimeError for bad shards
        raise CheckpointError(f"{path}: cannot load shards ({type(e).__name__}: {_short(e)})") from None
    state.load(to_fill)
    return meta, rank_state


def load_checkpoint_rank_state(path: Path, rank: int) -> tuple[int, Optional[dict[str, Any]]]:
    """(rank, saved JSON state of that rank) without touching tensors."""
    rank_file = path / f"rank{rank}.json"
    return rank, (_read_json(rank_file) if rank_file.is_file() else None)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
