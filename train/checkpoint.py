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

Async saves (`checkpoint.async_save`): the state is copied to CPU memory at the save
step, a background thread writes the shards, and the marker + rename happen only once
that write has finished (`AsyncCheckpoint.finish`, called when the write is seen done,
before the next save, and at the end of training), so an unfinished write is never loaded.

Before any shard is read, `validate_checkpoint` checks the marker, the JSON files, the
metadata and that every shard file exists with at least the bytes the metadata expects,
so a truncated checkpoint fails with the file it concerns, on every rank alike.

A save that runs out of disk space raises DiskFullError (train/disk_space.py) naming the
directory and the bytes needed and free, after removing its partial `.tmp` directory.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from parallel.checkpointing import CheckpointState
from train.disk_space import disk_full_reported, state_bytes

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the path and the cause."""


def _metadata_classes() -> set[tuple[str, str]]:
    """The classes DCP metadata is made of: those defined in torch.distributed.checkpoint.metadata
    (Metadata, TensorStorageMetadata, ChunkStorageMetadata, ...) and the file writer's _StorageInfo."""
    module = dcp_metadata.__name__
    found = {(module, n) for n, v in vars(dcp_metadata).items() if isinstance(v, type) and v.__module__ == module}
    return found | {("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: DCP's own dataclasses, torch dtypes/sizes and paths.

    Names must match the allow-list exactly: a whole-module allowance would let protocol-4
    dotted names through (e.g. `torch.distributed.checkpoint.filesystem` + `os.system`).
    """

    _ALLOWED = _metadata_classes() | {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that non-tensor entries (optimizer hyper-parameters and the like)
    are unpickled with weights_only=True; DCP's own planner uses weights_only=False."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)  # refuses anything but plain data; raises before executing
        except Exception as e:
            fqn = getattr(getattr(read_item, "dest_index", None), "fqn", "?")
            raise CheckpointError(f"entry {fqn!r} refused: {_short(e)}") from None
        value.seek(0)
        super().load_bytes(read_item, value)  # the same bytes, now known to hold only plain data


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


def _checkpoint_group() -> Optional[Any]:
    """A gloo group for async saves' background collectives (None without a process group).

    The background thread must not share the training collectives' group: two threads
    issuing collectives on one group can interleave differently on different ranks.
    Created on first use, which is collective: every rank saves at the same step.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    global _CKPT_GROUP
    default = dist.distributed_c10d._get_default_group()
    if _CKPT_GROUP is None or _CKPT_GROUP[0] is not default:  # first use, or a new default group
        _CKPT_GROUP = (default, dist.new_group(backend="gloo"))
    return _CKPT_GROUP[1]


_CKPT_GROUP: Optional[tuple[Any, Any]] = None  # (the default group it belongs to, the gloo group)


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


def _fresh_tmp_dir(root: Path, step: int, is_main: bool, barrier: Callable[[], None]) -> tuple[Path, Path]:
    """The step's final directory and an empty `.tmp` beside it (made by the main rank, seen by all)."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return final, tmp


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
    final, tmp = _fresh_tmp_dir(root, step, is_main, barrier)
    state_dict = state.state_dict()
    with disk_full_reported(root, tmp, state_bytes(state_dict), remove_tmp=is_main):
        dcp.save(state_dict, checkpoint_id=str(tmp))
        _write_json(tmp / f"rank{rank}.json", rank_state)
    barrier()
    if is_main:
        with disk_full_reported(root, tmp, 0, remove_tmp=True):
            _write_json(tmp / "meta.json", meta)
            _publish(root, tmp, final, step, keep_last)
    barrier()
    return final


class AsyncCheckpoint:
    """A checkpoint whose shards a background thread is still writing to `tmp`.

    `finish()` waits for the write and, on the main rank, writes the marker and publishes
    the directory. The main rank may publish as soon as its own write is done: DCP's
    coordinator completes only after every rank has written its shards (and each rank wrote
    its rank{r}.json before starting), so no cross-rank barrier is needed here.
    """

    def __init__(self, future: Future, root: Path, tmp: Path, final: Path, step: int, is_main: bool, keep_last: int,
                 needed_bytes: int = 0):
        self.future, self.root, self.tmp, self.final = future, root, tmp, final
        self.step, self.is_main, self.keep_last, self.needed_bytes = step, is_main, keep_last, needed_bytes

    def done(self) -> bool:
        return self.future.done()

    def finish(self) -> Path:
        with disk_full_reported(self.root, self.tmp, self.needed_bytes, remove_tmp=self.is_main):
            try:
                self.future.result()
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                raise CheckpointError(f"{self.tmp}: async save failed ({_describe(e)})") from None
            if self.is_main:
                _publish(self.root, self.tmp, self.final, self.step, self.keep_last)
        return self.final


def start_async_save(
    root: Path,
    step: int,
    state: CheckpointState,
    meta: dict[str, Any],
    rank_state: dict[str, Any],
    rank: int,
    is_main: bool,
    barrier: Callable[[], None],
    keep_last: int,
) -> AsyncCheckpoint:
    """Copy the state to CPU memory and write it in a background thread; publish with finish().

    Blocks only for the copy (and a barrier so the directory exists on every rank).
    """
    final, tmp = _fresh_tmp_dir(root, step, is_main, barrier)
    state_dict = state.state_dict()
    needed = state_bytes(state_dict)
    with disk_full_reported(root, tmp, needed, remove_tmp=is_main):
        _write_json(tmp / f"rank{rank}.json", rank_state)
        if is_main:
            _write_json(tmp / "meta.json", meta)
    response = dcp.async_save(state_dict, checkpoint_id=str(tmp), process_group=_checkpoint_group())
    future = getattr(response, "upload_completion", response)  # AsyncSaveResponse with async staging
    return AsyncCheckpoint(future, root, tmp, final, step, is_main, keep_last, needed)


def _publish(root: Path, tmp: Path, final: Path, step: int, keep_last: int) -> None:
    """Main rank: mark `tmp` complete, rename it to `final`, prune old and stale directories.

    A directory loses its marker before it is deleted, so a crash mid-deletion never
    leaves a marked but partial checkpoint behind.
    """
    marker = tmp / MARKER
    with open(marker, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step after resuming from an older checkpoint
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        (old / MARKER).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, stale in complete_checkpoints(root)[:-keep_last]:
        _remove(stale)
    for p in root.glob("step_*.tmp"):  # left by a save that was killed; only one save is ever in flight
        m = re.match(r"^step_(\d+)\.tmp$", p.name)
        if m and int(m.group(1)) < step:
            _remove(p)


def _remove(path: Path) -> None:
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def validate_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], Optional[dict[str, Any]], Metadata]:
    """Check a checkpoint without reading its shards: (meta, this rank's JSON state or None, DCP metadata).

    Raises CheckpointError naming the file and the cause: no marker, unreadable JSON or
    metadata, metadata referring to classes outside the allow-list, a missing or truncated shard.
    """
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    meta = _read_json(path / "meta.json")
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path / 'meta.json'}: not checkpoint metadata (no 'step')")
    rank_state = read_rank_state(path, rank)
    metadata = SafeFileSystemReader(str(path)).read_metadata()
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise CheckpointError(f"{path / '.metadata'}: no shard index")
    needed: dict[str, int] = {}
    for info in storage.values():
        rel, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise CheckpointError(f"{path / '.metadata'}: bad shard path {rel!r}")
        if not (isinstance(offset, int) and isinstance(length, int)):
            raise CheckpointError(f"{path / '.metadata'}: bad extent for {rel} ({offset!r}, {length!r})")
        needed[rel] = max(needed.get(rel, 0), offset + length)
    for rel, size in sorted(needed.items()):
        try:
            have = (path / rel).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path / rel}: missing shard file") from None
        if have < size:
            raise CheckpointError(f"{path / rel}: truncated shard ({have} bytes; the metadata expects at least {size})")
    return meta, rank_state, metadata


def load_checkpoint(
    path: Path, state: CheckpointState, rank: int, agree: Optional[Callable[[bool], bool]] = None
) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Load model and optimizer in place; return (meta, this rank's saved JSON state or None).

    A rank that did not exist when the checkpoint was saved (a larger world) gets None.
    `agree(ok)` (distributed runs) returns whether every rank validated the checkpoint, so
    all ranks either enter DCP's collective load together or all skip this checkpoint.
    """
    problem: Optional[CheckpointError] = None
    try:
        meta, rank_state, _ = validate_checkpoint(path, rank)
    except CheckpointError as e:
        problem = e
    if agree is not None and not agree(problem is None):
        raise problem or CheckpointError(f"{path}: another rank cannot read this checkpoint")
    if problem is not None:
        raise problem
    to_fill = state.state_dict()
    try:
        dcp.load(to_fill, storage_reader=SafeFileSystemReader(str(path)), planner=_SafeLoadPlanner())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException) wraps every rank's error
        raise CheckpointError(f"{path}: cannot load shards ({_describe(e)})") from None
    state.load(to_fill)
    return meta, rank_state


def read_rank_state(path: Path, rank: int) -> Optional[dict[str, Any]]:
    """The saved JSON state (data position, RNG) of `rank`, or None if that rank did not exist."""
    rank_file = path / f"rank{rank}.json"
    return _read_json(rank_file) if rank_file.is_file() else None


def _describe(e: BaseException) -> str:
    """One line per failing rank: the underlying exception, not DCP's wrapper and traceback."""
    if isinstance(e, CheckpointException):
        parts = []
        for r, failure in sorted(e.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {r}: {_describe(inner)}")
        return "; ".join(parts) or "unknown failure"
    if isinstance(e, CheckpointError):
        return str(e)
    return f"{type(e).__name__}: {_short(e)}"


def _short(e: BaseException) -> str:
    text = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(text) > 1 and text[0].startswith("Weights only load failed"):
        # torch.load(weights_only=True) puts the actual cause between a preamble and a pointer to the docs
        cause = [t for t in text[1:] if not t.startswith(("Please file an issue", "Check the documentation"))]
        return "weights_only unpickler: " + (" ".join(cause) or text[1])[:300]
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
