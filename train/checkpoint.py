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
that write has finished (`Checkpointer.finish`, called when the write is seen done,
before the next save, and at the end of training), so an unfinished write is never loaded.
The writer thread is the Checkpointer's own and `Checkpointer.close` joins it: dcp.async_save's
executor shuts itself down with wait=False, so its thread, still holding the save's process
group, could outlive the run and keep that group's gloo threads alive into interpreter exit.

Before any shard is read, `validate_checkpoint` checks the marker, the JSON files, the
metadata and that every shard file exists with at least the bytes the metadata expects,
so a truncated checkpoint fails with the file it concerns, on every rank alike.

Reading without a training process (export, inference): `resolve_checkpoint`, `read_meta`,
`saved_config` / `saved_model_config`, `SavedModel` (model tensors by name, or dim-0 row
ranges of them, one at a time) and `describe_error` for DCP's failures.

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
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from omegaconf import OmegaConf
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import state_dict_saver as dcp_saver
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from models.config import ModelConfig
from parallel.checkpointing import CheckpointState
from train.config import CheckpointConfig, Config
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


def forget_checkpoint_group() -> None:
    """Drop the async-save group (at process-group teardown: it must not outlive them)."""
    global _CKPT_GROUP
    _CKPT_GROUP = None


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


@dataclass
class AsyncCheckpoint:
    """A checkpoint whose shards a background thread is still writing to `tmp`."""

    future: Future
    tmp: Path
    final: Path
    step: int
    needed_bytes: int = 0  # this rank's shard bytes, for a disk-full report

    def done(self) -> bool:
        return self.future.done()


class Checkpointer:
    """The checkpoints of one run in `root` (RUN_DIR/checkpoints); every rank calls each method
    at the same step.

    `save` writes synchronously, or (`cfg.async_save`) copies the state to CPU memory and leaves
    the write to a background thread, published by `finish`. At most one save is in flight.
    """

    def __init__(self, root: Path, cfg: CheckpointConfig, state: CheckpointState) -> None:
        self.root, self.state, self.ctx = root, state, state.ctx
        self.keep_last, self.async_save = cfg.keep_last, cfg.async_save
        self.pending: Optional[AsyncCheckpoint] = None  # an async save still being written
        self._writer: Optional[ThreadPoolExecutor] = None  # the async saves' background thread

    def save(self, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Write the checkpoint of `step`: model and optimizer (DCP shards), `meta` (meta.json)
        and this rank's `rank_state` (rank{r}.json: data position, RNG). Returns its directory,
        published on return, or (async) by a later `finish`."""
        self.finish()  # only here does a step wait for a background write
        final, tmp = self._fresh_tmp_dir(step)
        state_dict = self.state.state_dict()
        needed = state_bytes(state_dict)
        is_main = self.ctx.is_main
        with disk_full_reported(self.root, tmp, needed, remove_tmp=is_main):
            _write_json(tmp / f"rank{self.ctx.rank}.json", rank_state)
            if is_main:
                _write_json(tmp / "meta.json", meta)
            if not self.async_save:
                dcp.save(state_dict, checkpoint_id=str(tmp))
        if self.async_save:
            self.pending = AsyncCheckpoint(self._write_in_background(state_dict, tmp), tmp, final, step, needed)
            return final
        self.ctx.barrier()  # every rank's shards are written
        if is_main:
            with disk_full_reported(self.root, tmp, 0, remove_tmp=True):
                self._publish(tmp, final, step)
        self.ctx.barrier()
        return final

    def finish(self, wait: bool = True) -> Optional[Path]:
        """Publish the in-flight async checkpoint once written (waiting for the write if `wait`).

        The main rank may publish as soon as its own write is done: DCP's coordinator completes
        only after every rank has written its shards (and each rank wrote its rank{r}.json
        before starting), so no cross-rank barrier is needed here.
        """
        pending = self.pending
        if pending is None or not (wait or pending.done()):
            return None
        self.pending = None
        with disk_full_reported(self.root, pending.tmp, pending.needed_bytes, remove_tmp=self.ctx.is_main):
            try:
                pending.future.result()
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                raise CheckpointError(f"{pending.tmp}: async save failed ({describe_error(e)})") from None
            if self.ctx.is_main:
                self._publish(pending.tmp, pending.final, pending.step)
        return pending.final

    def _write_in_background(self, state_dict: dict[str, Any], tmp: Path) -> Future:
        """What dcp.async_save does (copy to CPU memory now, then dcp.save on a background thread)
        on this Checkpointer's own writer thread, which `close` can join."""
        stager = DefaultStager(StagingOptions(False, False, False, False))  # dcp.async_save's default
        staged = stager.stage(state_dict)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeforge_checkpoint")
        return self._writer.submit(_save_staged, staged, stager, str(tmp), _checkpoint_group())

    def close(self) -> None:
        """Join the background writer (after its write, published or not): once this returns, no thread
        of ours holds the async-save group, so the process groups can end before interpreter exit."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def load_latest(self) -> Optional[tuple[Path, dict[str, Any], Optional[dict[str, Any]]]]:
        """Load the newest complete checkpoint, falling back to older ones if corrupt:
        (its path, meta, this rank's JSON state or None), or None when there is none.

        If checkpoints exist but none loads, raise rather than let the run start over on top of them.
        """
        agree = None
        if self.ctx.distributed:  # every rank must pick the same checkpoint
            def agree(ok: bool) -> bool:
                flag = torch.tensor([float(not ok)], device=self.ctx.device)
                return float(self.ctx.all_reduce_sum(flag)) == 0

        failures = []
        for _, path in reversed(complete_checkpoints(self.root)):
            try:
                meta, rank_state = load_checkpoint(path, self.state, self.ctx.rank, agree=agree)
            except CheckpointError as e:
                log.error("cannot resume from %s: %s; trying an older checkpoint", path, e)
                failures.append(str(e))
                continue
            return path, meta, rank_state
        if failures:
            raise CheckpointError(
                f"none of the {len(failures)} complete checkpoints in {self.root} can be loaded; "
                "move them away to start the run over: " + "; ".join(failures))
        return None

    def _fresh_tmp_dir(self, step: int) -> tuple[Path, Path]:
        """The step's final directory and an empty `.tmp` beside it (made by the main rank, seen by all)."""
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.ctx.barrier()
        return final, tmp

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
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
        _fsync_dir(self.root)
        for _, stale in complete_checkpoints(self.root)[:-self.keep_last]:
            _remove(stale)
        for p in self.root.glob("step_*.tmp"):  # left by a save that was killed; only one save is ever in flight
            m = re.match(r"^step_(\d+)\.tmp$", p.name)
            if m and int(m.group(1)) < step:
                _remove(p)


def _save_staged(staged: dict[str, Any], stager: DefaultStager, checkpoint_id: str, group: Optional[Any]) -> Any:
    """The background writer's job: DCP's collective save of the CPU copy, then the copy's release."""
    try:
        return dcp_saver.save(staged, checkpoint_id=checkpoint_id, process_group=group)  # looked up now, as DCP does
    finally:
        stager.close()


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
    meta = read_meta(path)
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
        meta, rank_state, metadata = validate_checkpoint(path, rank)
    except CheckpointError as e:
        problem = e
    if agree is not None and not agree(problem is None):
        raise problem or CheckpointError(f"{path}: another rank cannot read this checkpoint")
    if problem is not None:
        raise problem
    to_fill = state.state_dict(with_ema=has_ema(metadata))  # without one, CheckpointState.load starts it anew
    try:
        dcp.load(to_fill, storage_reader=SafeFileSystemReader(str(path)), planner=_SafeLoadPlanner())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException) wraps every rank's error
        raise CheckpointError(f"{path}: cannot load shards ({describe_error(e)})") from None
    state.load(to_fill)
    return meta, rank_state


def has_ema(metadata: Metadata) -> bool:
    """Whether the checkpoint holds an EMA of the weights (train.ema_decay > 0 when it was saved)."""
    return any(key.startswith("ema.") for key in metadata.state_dict_metadata)


def no_ema(path: Path) -> CheckpointError:
    """The error for --ema on a checkpoint without an EMA."""
    return CheckpointError(f"{path}: no EMA of the weights in this checkpoint (its run had train.ema_decay=0); "
                           "leave out --ema, or train with train.ema_decay > 0")


def read_rank_state(path: Path, rank: int) -> Optional[dict[str, Any]]:
    """The saved JSON state (data position, RNG) of `rank`, or None if that rank did not exist."""
    rank_file = path / f"rank{rank}.json"
    return _read_json(rank_file) if rank_file.is_file() else None


# ------------------------------------------------------------------------------------------ reading


def resolve_checkpoint(path: Path) -> Path:
    """A step_N directory; a run directory or its checkpoints/ gives the newest complete one."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    if (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    raise CheckpointError(f"{path}: no complete checkpoint found (expected step_N/ with a {MARKER} marker)")


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's meta.json: step, tokens seen, counters and the resolved config."""
    meta = _read_json(path / "meta.json")
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path / 'meta.json'}: not checkpoint metadata (no 'step')")
    return meta


_Schema = TypeVar("_Schema")


def _saved_section(path: Path, schema: type[_Schema], *keys: str) -> _Schema:
    """The saved config (or its section under `keys`) merged over `schema`'s defaults."""
    values: Any = read_meta(path).get("config")
    for key in keys:
        values = values.get(key) if isinstance(values, dict) else None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path / 'meta.json'}: no saved {'.'.join(('config',) + keys)}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))  # type: ignore[return-value]


def saved_config(path: Path) -> Config:
    """The run's resolved config, as saved in meta.json."""
    return _saved_section(path, Config)


def saved_model_config(path: Path) -> ModelConfig:
    """The model section of the saved config (all that export needs)."""
    return _saved_section(path, ModelConfig, "model")


class _CachedMetadataReader(SafeFileSystemReader):
    """SafeFileSystemReader that unpickles the (allow-listed) metadata once, not on every load."""

    _cached: Optional[Metadata] = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._cached is None:
            self._cached = super().read_metadata(*args, **kwargs)
        return self._cached


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Loads given regions of saved tensors: {fqn: (offsets, destination buffer of the region's size)}.

    DCP's resharding logic (create_read_items_for_chunk_list) finds the saved chunks that
    overlap each region, so a region can span shards written by several ranks.
    """

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__()
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:  # type: ignore[override]
        self.state_dict, self.metadata, self.is_coordinator = state_dict, metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (offsets, buf) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.size())
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        self.plan = LoadPlan(items)
        return self.plan

    def lookup_tensor(self, index) -> torch.Tensor:  # type: ignore[override]
        return self.regions[index.fqn][1]


class SavedModel:
    """The model tensors of one checkpoint, read on demand by parameter name, in one process.

    Any saving layout reads alike: DCP reassembles FSDP shards, and row ranges are read by
    their global offsets (a range may span chunks saved by several ranks). `ema=True` reads the
    parameters' EMA (train.ema_decay) in their place, and the buffers (router biases) as saved.
    """

    def __init__(self, path: Path, ema: bool = False) -> None:
        self.path = path
        self.reader = _CachedMetadataReader(str(path))
        self._keys: dict[str, str] = {}  # tensor name -> the checkpoint key read for it
        self.tensors: dict[str, TensorStorageMetadata] = {}
        saved = self.reader.read_metadata().state_dict_metadata
        for section in ("model.", "ema.") if ema else ("model.",):
            for k, v in saved.items():
                if k.startswith(section) and isinstance(v, TensorStorageMetadata):
                    self._keys[k[len(section):]], self.tensors[k[len(section):]] = k, v
        if ema and not any(k.startswith("ema.") for k in self._keys.values()):
            raise no_ema(path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.size) for k, v in self.tensors.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].properties.dtype

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of tensor `name` (the whole tensor by default)."""
        md = self.tensors[name]
        size = list(md.size)
        if size:
            stop = size[0] if stop is None else stop
            size[0] = stop - start
        buf = torch.empty(size, dtype=md.properties.dtype)
        offsets = (start,) + (0,) * (len(size) - 1) if size else ()
        try:
            with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({}, storage_reader=self.reader, planner=_RegionLoadPlanner({self._keys[name]: (offsets, buf)}),
                         no_dist=True)
        except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException): unreadable shards
            raise CheckpointError(f"{self.path}: cannot read {self._keys[name]} ({describe_error(e)})") from None
        return buf

    def saved_rows(self, name: str, row: int) -> tuple[int, int]:
        """The dim-0 range [first, stop) of the saved chunk holding `row` (under EP: one rank's experts)."""
        for chunk in self.tensors[name].chunks:
            first = chunk.offsets[0]
            if first <= row < first + chunk.sizes[0]:
                return first, first + chunk.sizes[0]
        raise CheckpointError(f"{self.path}: {self._keys[name]} has no saved chunk for row {row}")


def describe_error(e: BaseException) -> str:
    """One line per failing rank: the underlying exception, not DCP's wrapper and traceback."""
    if isinstance(e, CheckpointException):
        parts = []
        for r, failure in sorted(e.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {r}: {describe_error(inner)}")
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
